"""The server's adapters: which are loaded (name -> version), the requests using each, and every change to them.

This lives in vLLM's API-server process. The adapter tensors live in the worker's registry (the engine's worker
extension); this class drives it through `engine_client.collective_rpc`, as `PreftEngine` does, and keeps a mirror of
its entries to route and salt requests.

Pinning. A request reads its adapter's version when it starts and holds the adapter until it finishes (prompt and
generated tokens, since vLLM may preempt and recompute a prompt). An update or an unload of that adapter waits until no
request holds it, and new requests for it wait for the change to finish. So a request never mixes versions, the worker
never sees a request for a version it no longer holds, and requests for other adapters and the base run on
undisturbed.

Errors are `AdapterError(status, message)`: 404 for an adapter that is not loaded (naming it and listing the loaded
ones), 400 for a bad directory (the file and the reason) or a wrong method / rank (with the fix). A refused change
leaves everything as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from preft_rl.adapters.config import PreftConfig
from preft_rl.adapters.serialization import SERVED_NAME
from preft_rl.engine.registry import AdapterEntry
from preft_rl.engine.vllm_compat import adapter_cache_salt, base_cache_salt  # noqa: F401 (base_cache_salt: re-exported)
from preft_rl.engine.worker import agreed_result, entry_from_dict, pack_state

logger = logging.getLogger(__name__)

# Names go into cache salts ("preft:<name>:v<version>:p<prompt_len>") and URLs: no ':' (so no two salts can collide),
# no spaces, and nothing a base model name (a path or a hub id with '/') is likely to be.
NAME_PATTERN = SERVED_NAME


class AdapterError(Exception):
    """A refused adapter request or change, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def cache_salt(entry: AdapterEntry, client_salt: str | None) -> str:
    """The prefix-cache salt of an adapted prompt (vllm_compat.adapter_cache_salt, which vllm_compat.tag_request sets for
    the server and PreftEngine alike): adapter and version, then the client's own salt if it sent one. What the adapter
    did at each token is in each KV block's own key (vllm_compat.adapter_block_key)."""
    return adapter_cache_salt(entry.name, entry.version, client_salt)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What `preft-rl serve` passes to the plugin (as JSON in PREFT_RL_SERVE)."""

    method: str
    max_adapters: int
    max_rank: int
    model_class: str
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # loaded at start-up: name -> directory
    runtime_updates: bool = False  # the load / unload routes
    adapter_scope: str = "prompt"  # "all": the same server with adapters on every token (a benchmark baseline)
    peft_lora_as_prefill_only: bool = False  # start-up adapters may be plain PEFT LoRA directories
    max_cpu_adapters: int = 0  # slots as a cache: adapters registered at most (0: max_adapters, every one in a slot)
    adapter_dir: str | None = None  # adapters found here (DIR/NAME) are loaded on their first request
    tenant_keys: str | None = None  # --tenant-keys FILE (tenants.TenantKeys)
    admin_key_hashes: list[str] = dataclasses.field(default_factory=list)  # with tenant keys: the admin keys, hashed
    record_dir: str | None = None  # --record DIR: the traffic store (preft_rl.traffic)
    record_max_age_s: float | None = None
    record_max_records: int | None = None

    @property
    def registered_limit(self) -> int:
        return max(self.max_cpu_adapters, self.max_adapters)

    @property
    def slot_limit(self) -> int:
        """The slot count requests carry for the scheduler's slot limit (0: no caching)."""
        return self.max_adapters if self.registered_limit > self.max_adapters else 0


def read_adapter(name: str, path: Any, settings: ServeSettings, peft_lora_as_prefill_only: bool = False,
                 ) -> tuple[dict[str, Any], PreftConfig]:
    """Read and check an adapter directory: (its state packed for the worker, its config). Every refusal names the
    file or the setting and says what to do."""
    from preft_rl.engine.common import adapter_source

    if not isinstance(path, str) or not path:
        raise AdapterError(400, f"adapter {name!r}: adapter_path={path!r} must be the path of a directory written "
                                "by PreftModel.save_pretrained, on the server's machine")
    if not Path(path).is_dir():
        raise AdapterError(400, f"adapter {name!r}: {path} is not a directory on the server; pass the directory "
                                "written by PreftModel.save_pretrained")
    from preft_rl.adapters.serialization import PlainPeftLoraError

    try:
        state, config = adapter_source(path, None, peft_lora_as_prefill_only)
    except PlainPeftLoraError:
        raise AdapterError(400, f"adapter {name!r}: {path} is a plain PEFT LoRA, trained to act on every token; serving "
                                "it on prompt tokens only changes what it does. If that is what you want, pass "
                                '"load_peft_lora_as_prefill_only": true (load route) or start the server with '
                                "--load-peft-lora-as-prefill-only") from None
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise AdapterError(400, f"adapter {name!r}: {exc}") from None
    s = settings
    if config.method != s.method:
        raise AdapterError(400, f"adapter {name!r} in {path} is a {config.method} adapter but this server serves "
                                f"{s.method} adapters (--method {s.method}); serve it from a server started with "
                                f"--method {config.method}")
    if config.r > s.max_rank:
        raise AdapterError(400, f"adapter {name!r} in {path} has rank {config.r} but this server takes at most "
                                f"--max-rank {s.max_rank}; restart the server with --max-rank {config.r} or more")
    if config.adapter_scope != s.adapter_scope:
        raise AdapterError(400, f"adapter {name!r} in {path} has adapter_scope={config.adapter_scope!r} but this server "
                                f"applies adapters with adapter_scope={s.adapter_scope!r}; serve it from a server started "
                                f"with --adapter-scope {config.adapter_scope}")
    try:
        packed = pack_state(name, state)  # the type checks the worker would make, before anything is sent
    except (ValueError, TypeError) as exc:
        raise AdapterError(400, f"adapter {name!r} in {path}: {exc}") from None
    return packed, config


class ServedAdapters:
    """The loaded adapters of one server, their in-flight requests, and load / update / unload."""

    def __init__(self, engine_client: Any, settings: ServeSettings, base_names: list[str]) -> None:
        self.engine_client = engine_client
        self.settings = settings
        self.base_names = base_names
        self.entries: dict[str, AdapterEntry] = {}
        self.paths: dict[str, str] = {}
        self._readers: Counter[str] = Counter()  # requests in flight per adapter name
        self._changing: set[str] = set()  # names an update / unload is waiting for or applying
        self._state = asyncio.Condition()
        self._admin = asyncio.Lock()  # one change at a time, in order, on every rank
        self.broken: dict[str, int] = {}  # name -> version whose activations went non-finite: its requests get a 422
        self._used: dict[str, None] = {}  # adapters by last request, oldest first (--adapter-dir eviction)
        self._from_dir: set[str] = set()  # adapters loaded from --adapter-dir on a first request (may be unloaded again)
        self.dir_loads = 0  # adapters loaded from --adapter-dir so far (first requests, and requests after an unload)
        self.dir_unloads = 0  # directory adapters unloaded to make room
        # --adapter-dir adapters first requests wait for: name -> [(future, take a hold)]; one task loads them in batches
        self._wanted: dict[str, list[tuple[asyncio.Future[AdapterEntry], bool]]] = {}
        self._loader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ requests
    def unknown(self, name: str) -> AdapterError:
        """The 404 for an adapter that is not loaded. Under --tenant-keys a tenant's request sees only its own adapters
        (and the base where allowed) in it: the same answer whether `name` is another tenant's or exists nowhere."""
        from .tenants import ADMIN, current_tenant, visible

        tenant = current_tenant.get()
        loaded = sorted(visible(list(self.entries)))
        shown = ", ".join(repr(n) for n in loaded[:20]) + (" ..." if len(loaded) > 20 else "") if loaded else "none"
        message = f"adapter {name!r} is not loaded on this server. Loaded adapters: {shown}."
        if tenant is None or tenant.base:
            message += f" The base model is {self.base_names[0]!r} (no adapter)."
        if tenant is None or tenant is ADMIN:
            message += (" Load it with POST /v1/load_preft_adapter {\"adapter_name\": ..., \"adapter_path\": ...} (when "
                        "the server runs with --enable-adapter-updates).")
        return AdapterError(404, message)

    @contextlib.asynccontextmanager
    async def serving(self, name: str) -> AsyncIterator[AdapterEntry]:
        """Hold adapter `name` for one request: its entry (version) cannot change, and it cannot be unloaded to make
        room, until the request ends. An adapter in --adapter-dir that is not loaded is loaded first (`resolve`)."""
        entry = await self._hold(name)
        try:
            yield entry
        finally:
            await self._release(name)

    async def _hold(self, name: str) -> AdapterEntry:
        async with self._state:
            await self._state.wait_for(lambda: name not in self._changing)
            if name in self.entries:
                return self._take(name)
        entry = await self._from_directory(name, hold=True)
        if entry is None:
            raise self.unknown(name)
        return entry

    async def _release(self, name: str) -> None:
        async with self._state:
            self._readers[name] -= 1
            if not self._readers[name]:
                del self._readers[name]
            self._state.notify_all()

    def _take(self, name: str) -> AdapterEntry:
        """One more request holds `name` (call with the state lock held)."""
        self._readers[name] += 1
        self._used.pop(name, None)
        self._used[name] = None
        return self.entries[name]

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """Wait until no request holds `name` (new ones wait meanwhile), then hold it alone."""
        async with self._state:
            self._changing.add(name)
            await self._state.wait_for(lambda: not self._readers[name])
        try:
            yield
        finally:
            async with self._state:
                self._changing.discard(name)
                self._state.notify_all()

    def broken_error(self, entry: AdapterEntry) -> AdapterError | None:
        """A 422 for a request of an adapter version that produced non-finite activations; None if it is sound."""
        if self.broken.get(entry.name) != entry.version:
            return None
        return AdapterError(
            422,
            f"adapter {entry.name!r} (version {entry.version}) produced non-finite activations (NaN or inf) on a prompt: its "
            "weights are finite but too large for this model. Its requests fail until it is updated (POST "
            '/v1/load_preft_adapter with "load_inplace": true) or unloaded; every other adapter keeps serving.',
        )

    async def check_failed(self, entry: AdapterEntry) -> AdapterError | None:
        """After a request of `entry` ended with finish_reason "error": the 422 if the worker marked this adapter version
        broken (the request failed alone, DESIGN invariant 8); None for any other engine error (vLLM answers it)."""
        broken = await self._rpc("preft_broken")
        if broken.get(entry.name) == entry.version:
            self.broken[entry.name] = entry.version
        return self.broken_error(entry)

    def in_flight(self, name: str) -> int:
        return self._readers[name]

    # ------------------------------------------------------------------------------ changes
    async def _rpc(self, method: str, *args: Any) -> Any:
        return agreed_result(method, await self.engine_client.collective_rpc(method, args=args))

    def _check_name(self, name: Any) -> str:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise AdapterError(400, f"adapter_name={name!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
                                    "with a letter or digit")
        if name in self.base_names:
            raise AdapterError(400, f"adapter_name={name!r} is the base model's name; choose another name")
        return name

    async def load(self, name: Any, path: Any, *, replace: bool = False, peft_lora_as_prefill_only: bool = False) -> AdapterEntry:
        """Load adapter `name` from `path`; with `replace=True` an adapter of that name is updated in place (its
        version goes up) once the requests using it finish. A plain PEFT LoRA directory needs
        `peft_lora_as_prefill_only=True` (it was trained on every token)."""
        name = self._check_name(name)
        packed, config = await asyncio.to_thread(read_adapter, name, path, self.settings, peft_lora_as_prefill_only)
        async with self._admin:
            if name in self.entries and not replace:
                raise AdapterError(400, f"adapter {name!r} is already loaded (version {self.entries[name].version}); "
                                        'pass "load_inplace": true to update it, or unload it first')
            if name not in self.entries and len(self.entries) >= self.settings.registered_limit:
                raise AdapterError(400, f"all {self.settings.registered_limit} adapters this server holds are loaded; "
                                        "unload an adapter first, or restart the server with a larger --max-cpu-adapters "
                                        "(adapters in host memory beyond the --max-adapters device slots)")
            if name in self.entries:
                async with self._exclusive(name):
                    entry = await self._replace(name, packed, config)
            else:
                entry = await self._add(name, packed, config)
            self.paths[name] = str(path)
        logger.info("adapter %r version %d loaded from %s", name, entry.version, path)
        return entry

    async def _add(self, name: str, packed: dict[str, Any], config: PreftConfig) -> AdapterEntry:
        return await self._commit("preft_add_adapter", name, packed, config)

    async def _replace(self, name: str, packed: dict[str, Any], config: PreftConfig) -> AdapterEntry:
        """New tensors, and settings (rank, targets, positions) that may differ, in the adapter's own slot; the version
        goes up (so no cached prompt of the old weights is reused). Refused as a whole, or applied as a whole."""
        return await self._commit("preft_replace_adapter", name, packed, config)

    async def _commit(self, method: str, name: str, packed: dict[str, Any], config: PreftConfig) -> AdapterEntry:
        """Send an add / replace to the worker; record the entry it reports, or raise its refusal as a 400."""
        try:
            data = await self._rpc(method, name, packed, dataclasses.asdict(config))
        except (ValueError, TypeError, KeyError) as exc:
            raise AdapterError(400, f"adapter {name!r}: {exc.args[0] if exc.args else exc}") from None
        self.entries[name] = entry = entry_from_dict(data)
        return entry

    async def unload(self, name: Any) -> None:
        if not isinstance(name, str) or name not in self.entries:
            raise self.unknown(str(name))
        async with self._admin:
            if name not in self.entries:
                raise self.unknown(name)
            async with self._exclusive(name):
                await self._rpc("preft_remove_adapter", name)
                del self.entries[name]
                self.paths.pop(name, None)
                self._used.pop(name, None)
                self._from_dir.discard(name)
        logger.info("adapter %r unloaded", name)

    async def resolve(self, name: str) -> bool:
        """Load adapter `name` from --adapter-dir (DIR/NAME) on its first request, as vLLM's LoRA resolvers do: True
        once it is loaded, False if the directory has no such adapter (the request gets the 404). A bad adapter
        directory raises its AdapterError. See `_load_wanted` for how loads are batched and room is made."""
        return await self._from_directory(name, hold=False) is not None

    async def _from_directory(self, name: str, hold: bool) -> AdapterEntry | None:
        """`name`'s entry once it is loaded from --adapter-dir, held for the caller's request when `hold` (taken in the
        same step as the load, so no other first request can unload it in between); None if it is not there."""
        directory = self.settings.adapter_dir
        if directory is None or not NAME_PATTERN.fullmatch(name) or name in self.base_names:
            return None
        if not os.path.isdir(os.path.join(directory, name)):
            return None
        async with self._state:
            await self._state.wait_for(lambda: name not in self._changing)
            if name in self.entries:
                return self._take(name) if hold else self.entries[name]
            waiter: asyncio.Future[AdapterEntry] = asyncio.get_running_loop().create_future()
            self._wanted.setdefault(name, []).append((waiter, hold))
            if self._loader is None or self._loader.done():
                self._loader = asyncio.create_task(self._load_wanted())
        try:
            return await waiter
        except asyncio.CancelledError:  # the client went away: give back a hold the loader took for it
            if hold and waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                await self._release(name)
            raise

    def _idle_from_directory(self) -> list[str]:
        """Adapters that may be unloaded to make room: loaded from the directory, no request in flight, no change
        pending; least recently requested first."""
        return [n for n in dict.fromkeys([*self._used, *self._from_dir])
                if n in self._from_dir and not self._readers[n] and n not in self._changing]

    async def _load_wanted(self) -> None:
        """Load every adapter that first requests wait for, in batches: read and check the files in a thread, then one
        `preft_swap_adapters` RPC unloads what must make room and adds the batch (a worker RPC is answered between
        engine steps, so a busy server answers one per step: one per batch, not one per adapter). When the server
        holds all it may (--max-cpu-adapters), the least recently requested adapters that came from the directory and
        have no request in flight are unloaded; with none such, the batch waits for a request to end (the wait a
        request over vLLM's max_loras has). An unloaded adapter's next request loads it again under a new version, so
        no prompt KV cached for the old files is reused. A bad directory fails its own requests only."""
        read: dict[str, tuple[dict[str, Any], PreftConfig] | AdapterError] = {}
        try:
            while self._wanted:
                read = {n: value for n, value in read.items() if n in self._wanted}
                fresh = [n for n in self._wanted if n not in read]
                read.update(await asyncio.to_thread(self._read_from_directory, fresh))
                if not await self._swap_in(read):
                    async with self._state:  # full, and every directory adapter in use: wait for a request to end
                        await self._state.wait_for(lambda: bool(self._idle_from_directory())
                                                   or len(self.entries) < self.settings.registered_limit)
        except BaseException as exc:  # never leave a request waiting (an engine failure, or the server shutting down)
            logger.exception("loading adapters from %s failed", self.settings.adapter_dir)
            for waiters in self._wanted.values():
                for waiter, _ in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            self._wanted.clear()
            if not isinstance(exc, Exception):
                raise

    def _read_from_directory(self, names: list[str]) -> dict[str, Any]:
        directory = self.settings.adapter_dir
        out: dict[str, Any] = {}
        for name in names:
            try:
                out[name] = read_adapter(name, os.path.join(directory, name), self.settings,
                                         self.settings.peft_lora_as_prefill_only)
            except AdapterError as exc:
                out[name] = exc
        return out

    async def _swap_in(self, read: dict[str, Any]) -> bool:
        """One batch: False when nothing could be loaded for want of room (the caller waits for a request to end)."""
        async with self._admin:
            async with self._state:
                wanted = [n for n in self._wanted if n in read]  # those asked for since the read wait for the next batch
                bad = {n: read.pop(n) for n in wanted if isinstance(read.get(n), AdapterError)}
                loaded = [n for n in wanted if n in self.entries]  # through the load route meanwhile (no change is
                # pending on any adapter: route changes hold the admin lock until they end)
                new = [n for n in wanted if n not in bad and n not in loaded]
                room = self.settings.registered_limit - len(self.entries)
                victims = self._idle_from_directory()[:max(0, len(new) - room)]
                batch = new[:max(0, room) + len(victims)]
                if new and not batch and not self._from_dir:
                    full = AdapterError(503, f"the server holds {self.settings.registered_limit} adapters already, none "
                                             f"of them loaded from {self.settings.adapter_dir} (only those are unloaded "
                                             "to make room); unload one, or restart the server with a larger "
                                             "--max-cpu-adapters")
                    bad.update({n: AdapterError(503, f"adapter {n!r}: {full.message}") for n in new})
                    new = []
                self._changing.update(victims)  # no request may take them from here on
                self._settle(bad, {n: self.entries[n] for n in loaded})
            if not batch:
                return not new
            try:
                result = await self._rpc("preft_swap_adapters", victims,
                                         [[n, read[n][0], dataclasses.asdict(read[n][1])] for n in batch])
            except BaseException:
                async with self._state:
                    self._changing.difference_update(victims)
                    self._state.notify_all()
                raise
            async with self._state:
                for name in result["removed"]:
                    del self.entries[name]
                    self.paths.pop(name, None)
                    self._used.pop(name, None)
                    self._from_dir.discard(name)
                    self.dir_unloads += 1
                self._changing.difference_update(victims)
                done: dict[str, AdapterEntry] = {}
                for name, data in result["added"].items():
                    read.pop(name, None)
                    if "error" in data:
                        bad[name] = AdapterError(400, f"adapter {name!r}: {data['message']}")
                        continue
                    self.entries[name] = done[name] = entry_from_dict(data)
                    self.paths[name] = os.path.join(self.settings.adapter_dir, name)
                    self._from_dir.add(name)
                    self._used[name] = None
                    self.dir_loads += 1
                self._settle(bad, done)
                self._state.notify_all()
        if victims:
            logger.info("adapters %s unloaded to make room", victims)
        logger.info("adapters %s loaded from %s", sorted(done), self.settings.adapter_dir)
        return True

    def _settle(self, failed: dict[str, AdapterError], loaded: dict[str, AdapterEntry]) -> None:
        """Answer the requests waiting for these adapters: the error, or the entry, held for the request that asked
        (call with the state lock held, in the step that loaded them)."""
        for name, outcome in [*failed.items(), *loaded.items()]:
            for waiter, hold in self._wanted.pop(name, []):
                if waiter.done():  # cancelled
                    continue
                if isinstance(outcome, AdapterError):
                    waiter.set_exception(outcome)
                else:
                    waiter.set_result(self._take(name) if hold else outcome)

    async def cache_stats(self) -> dict[str, int]:
        """Adapters held (`registered`), in device slots (`resident`), moved from host memory into a slot so far because
        their slot had gone to another adapter (`slot_loads`: slot misses), and loaded from / unloaded back to
        --adapter-dir so far (`dir_loads`, `dir_unloads`)."""
        engine = await self._rpc("preft_cache_stats")
        return {"registered": engine["registered"], "resident": engine["resident"], "slot_loads": engine["loads"],
                "dir_loads": self.dir_loads, "dir_unloads": self.dir_unloads}


_ids = itertools.count(1)


def next_request_id() -> int:
    """A fresh positive id for the LoRARequest-shaped record vLLM's model list and request routing use."""
    return next(_ids)
