"""preft-rl's vLLM plugins, declared as entry points in pyproject.toml and loaded by `vllm serve`:

- `register_models` (group `vllm.general_plugins`, every vLLM process): registers the PreFT model classes, so the
  engine core and every tensor-parallel worker can build `Preft<Method><Arch>` (`--hf-overrides`);
- `PreftEndpointPlugin` (group `vllm.endpoint_plugins`, the API-server process; opt-in through VLLM_PLUGINS, which
  `preft-rl serve` sets): sets up the worker extension's registry, loads the start-up adapters, routes each request's
  `model` to its adapter, and adds the load / unload routes when they are enabled.

The worker extension itself (`preft_rl.engine.worker.PreftWorkerExtension`) is vLLM's `--worker-extension-cls`.

How a request reaches its adapter. Every loaded adapter is listed in vLLM's model table as a `PreftAdapterRequest`
(a LoRARequest subclass), so vLLM's own checks accept its name as `model`, answer with that name, and list it in
/v1/models. The engine client's `generate` is wrapped: for a PreftAdapterRequest it drops the LoRA request, holds the
adapter for the request's life (`ServedAdapters.serving`), tells the worker which adapter and version (sampling
params' `extra_args`) and sets the prefix-cache salt from the tokenised prompt: `vllm_compat.tag_request`, the same
rule PreftEngine uses. A chat request for an adapter is rendered with its assistant messages' tokens marked as
sampled (DESIGN invariant 9; preft_rl/engine/server/chat.py). Every vLLM name patched or written here goes through preft_rl/engine/vllm_compat_serve.py.
"""

# No `from __future__ import annotations`: FastAPI reads the route handlers' annotations (Request) at run time.
import asyncio
import json
import logging
import os
from http import HTTPStatus
from typing import Any

from preft_rl.engine import vllm_compat_serve as serve_compat
from preft_rl.engine.vllm_compat import SAMPLED_SPANS_KEY, base_cache_salt, request_failed, tag_request

from .adapters import AdapterError, ServedAdapters, ServeSettings, next_request_id
from .chat import render_adapter_chat, responses_history_error
from .tenants import ADMIN, current_tenant, refuses, request_notes

from preft_rl.traffic.recording import RequestRecorder, feedback_reward
from preft_rl.traffic.store import FeedbackError

logger = logging.getLogger(__name__)

SETTINGS_ENV = "PREFT_RL_SERVE"  # JSON of ServeSettings, set by `preft-rl serve`
GENERAL_PLUGIN = "preft_rl"
ENDPOINT_PLUGIN = "preft_rl_serve"
LOAD_ROUTE = "/v1/load_preft_adapter"
UNLOAD_ROUTE = "/v1/unload_preft_adapter"
CACHE_ROUTE = "/v1/preft/cache"  # GET: ServedAdapters.cache_stats()
FEEDBACK_ROUTE = "/v1/feedback"  # POST, with --record: a tenant's reward for one of its recorded responses
TENANT_KEYS_RELOAD_ROUTE = "/v1/tenant-keys/reload"  # POST, admin, with --tenant-keys: read the file again


def register_models() -> None:
    """vLLM general plugin, in every vLLM process: the PreFT model classes; the adapter ops as graph-splitting ops, so
    compiled serving (--no-enforce-eager, -O) keeps them opaque and outside captured graphs, as PreftEngine does; and
    the scheduler's channel for failing one request (a bad adapter fails only its own requests) and the adapter
    prefix-cache block keys."""
    from preft_rl.engine.model import SPLITTING_OPS, register_preft_models
    from preft_rl.engine.vllm_compat import add_splitting_ops, install_scheduler_patches

    register_preft_models()
    add_splitting_ops(SPLITTING_OPS)
    install_scheduler_patches()  # the engine-core process runs the scheduler: a request can fail alone; block keys


def serve_settings() -> ServeSettings | None:
    raw = os.environ.get(SETTINGS_ENV)
    return None if not raw else ServeSettings(**json.loads(raw))


class PreftEndpointPlugin:
    """vLLM endpoint plugin: adapters per request, and the adapter routes (see the module docstring)."""

    name = ENDPOINT_PLUGIN
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.settings = serve_settings()

    def attach_router(self, app: Any) -> None:
        if self.settings is None:
            return
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()
        if self.settings.tenant_keys is not None:
            from .tenants import TenantAuthMiddleware, TenantKeyring

            keyring = TenantKeyring(self.settings.tenant_keys, self.settings.admin_key_hashes)
            app.add_middleware(TenantAuthMiddleware, keys=keyring, base_names=lambda: app.state.preft_adapters.base_names)

            @router.post(TENANT_KEYS_RELOAD_ROUTE)
            async def reload_tenant_keys(request: Request):
                """Admin only (a tenant's key gets 403 from the middleware): read the --tenant-keys file again. A bad
                file is refused (400) and the keys in force stay."""
                try:
                    counts = await asyncio.to_thread(keyring.reload)
                except ValueError as exc:
                    return error(AdapterError(400, f"{exc}; the keys in force are unchanged"))
                logger.info("tenant keys reloaded from %s: %s", keyring.path, counts)
                return JSONResponse(counts)

        @router.get(CACHE_ROUTE)
        async def preft_cache(request: Request):
            """Slots as a cache: adapters held, in device slots, slot loads, and --adapter-dir loads and unloads."""
            return JSONResponse(await request.app.state.preft_adapters.cache_stats())

        def error(exc: AdapterError) -> JSONResponse:
            return JSONResponse(status_code=exc.status, content={"error": {
                "message": exc.message, "type": HTTPStatus(exc.status).phrase.replace(" ", "") + "Error",
                "param": None, "code": exc.status}})

        async def body(request: Request) -> dict[str, Any]:
            from starlette.requests import ClientDisconnect

            try:
                data = await request.json()
            except ValueError:
                raise AdapterError(400, "the request body must be a JSON object") from None
            except ClientDisconnect:
                raise AdapterError(400, "the client went away before its request body arrived") from None
            if not isinstance(data, dict):
                raise AdapterError(400, f"the request body must be a JSON object, got {type(data).__name__}")
            return data

        if self.settings.record_dir is not None:
            @router.post(FEEDBACK_ROUTE)
            async def feedback(request: Request):
                """{"id": response id, "choice": 0, "reward": 0..1 | "thumbs": "up" | "down"}, with the tenant's key,
                on one of its recorded responses; once per response."""
                try:
                    data = await body(request)
                    tenant = current_tenant.get()
                    if tenant is None or tenant is ADMIN:
                        raise AdapterError(403, "feedback is given with the key of the tenant whose adapter answered")
                    response_id, choice = data.get("id"), data.get("choice", 0)
                    if not isinstance(response_id, str) or not response_id:
                        raise AdapterError(400, f"id={response_id!r} must be the id of a response (e.g. 'cmpl-...')")
                    if isinstance(choice, bool) or not isinstance(choice, int) or choice < 0:
                        raise AdapterError(400, f"choice={choice!r} must be the index of a choice (0, 1, ...)")
                    if set(data) - {"id", "choice", "reward", "thumbs"}:
                        raise AdapterError(400, f"unknown fields {sorted(set(data) - {'id', 'choice', 'reward', 'thumbs'})}; "
                                                'write {"id": ..., "choice": 0, "reward": 0..1} or "thumbs": "up" | "down"')
                    try:
                        reward = feedback_reward(data)
                    except ValueError as exc:
                        raise AdapterError(400, str(exc)) from None
                    try:
                        await asyncio.to_thread(request.app.state.preft_traffic.add_feedback, tenant.name, response_id,
                                                choice, reward)
                    except FeedbackError as exc:
                        raise AdapterError(exc.status, exc.message) from None
                except AdapterError as exc:
                    return error(exc)
                return JSONResponse({"id": response_id, "choice": choice, "reward": reward})

        if not self.settings.runtime_updates:  # the load / unload routes are off unless `preft-rl serve
            app.include_router(router)         # --enable-adapter-updates` (which also requires an API key)
            return

        @router.post(LOAD_ROUTE)
        async def load_preft_adapter(request: Request):
            """{"adapter_name": ..., "adapter_path": ..., "load_inplace": false, "load_peft_lora_as_prefill_only": false};
            load_inplace=true updates a loaded adapter (new weights, same name, next version) once the requests using
            it finish; load_peft_lora_as_prefill_only=true serves a plain PEFT LoRA on prompt tokens only."""
            served: ServedAdapters = request.app.state.preft_adapters
            try:
                data = await body(request)
                flags = {key: data.get(key, False) for key in ("load_inplace", "load_peft_lora_as_prefill_only")}
                for key, value in flags.items():
                    if not isinstance(value, bool):
                        raise AdapterError(400, f"{key}={value!r} must be true or false")
                entry = await served.load(data.get("adapter_name"), data.get("adapter_path"), replace=flags["load_inplace"],
                                          peft_lora_as_prefill_only=flags["load_peft_lora_as_prefill_only"])
            except AdapterError as exc:
                return error(exc)
            _list_adapter(request.app.state, entry.name, served.paths[entry.name])
            return JSONResponse({"adapter_name": entry.name, "version": entry.version, "rank": entry.rank,
                                 "method": entry.config.method})

        @router.post(UNLOAD_ROUTE)
        async def unload_preft_adapter(request: Request):
            """{"adapter_name": ...}; waits for the requests using the adapter to finish."""
            served: ServedAdapters = request.app.state.preft_adapters
            try:
                data = await body(request)
                name = data.get("adapter_name")
                await served.unload(name)
            except AdapterError as exc:
                return error(exc)
            serve_compat.unlist_adapter(request.app.state, name)
            return JSONResponse({"adapter_name": name, "unloaded": True})

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        if self.settings is None:
            logger.warning("preft_rl_serve endpoint plugin: %s is not set; start the server with `preft-rl serve`",
                           SETTINGS_ENV)
            return
        if engine_client is None:
            raise RuntimeError("preft-rl serve needs an engine (this is a render-only server)")
        s = self.settings
        from preft_rl.engine.worker import agreed_result

        agreed_result("preft_prepare", await engine_client.collective_rpc("preft_prepare"))
        info = agreed_result("preft_setup", await engine_client.collective_rpc(
            "preft_setup", args=(s.method, s.max_adapters, s.max_rank, s.adapter_scope == "prompt", s.model_class,
                                 s.registered_limit)))
        served = ServedAdapters(engine_client, s, serve_compat.base_model_names(state))
        state.preft_adapters = served
        state.preft_traffic = None
        if s.record_dir is not None:
            from preft_rl.traffic import SqliteTrafficStore

            state.preft_traffic = SqliteTrafficStore(s.record_dir, max_age_s=s.record_max_age_s,
                                                     max_records=s.record_max_records)
            logger.info("preft-rl serve: recording opted-in tenants' requests in %s", state.preft_traffic.path)
        install_request_routing(engine_client, served, state, state.preft_traffic)
        for name, path in s.adapters.items():
            try:
                await served.load(name, path, peft_lora_as_prefill_only=s.peft_lora_as_prefill_only)
            except AdapterError as exc:
                raise SystemExit(f"preft-rl serve: {exc.message}") from None
            _list_adapter(state, name, path)
        logger.info("preft-rl serve: %s adapters (adapter_scope=%s, up to %d of rank <= %d, %.2f MiB each): %s", s.method,
                    s.adapter_scope, s.max_adapters, s.max_rank, info["bytes_per_adapter"] / 2**20, sorted(served.entries))


def _list_adapter(state: Any, name: str, path: str) -> None:
    """Make `name` a valid `model` for vLLM's request checks, responses and /v1/models."""
    serve_compat.list_adapter(state, name, path, next_request_id())


def install_request_routing(engine_client: Any, served: ServedAdapters, state: Any = None, traffic: Any = None) -> None:
    """Wrap the engine client's generate (see the module docstring) and make vLLM's request checks PreFT-aware (an
    adapter in --adapter-dir is loaded on its first request and listed in `state`'s model table). With a traffic store
    (--record), each request of an opted-in tenant's adapter is recorded before its last output is passed on."""

    async def record(recorder: RequestRecorder) -> None:
        try:
            for future in [traffic.append(r) for r in recorder.records()]:
                await asyncio.wrap_future(future)
        except Exception:  # the client still gets its answer; the record is lost, and the log says so
            logger.exception("recording response %r of tenant %r failed", recorder.id, recorder.tenant)

    async def resolve(model: str) -> tuple[int, str] | None:
        """(status, message) if `model` is in --adapter-dir but cannot be loaded; None once it is loaded or when it is
        not there (the 404 stands)."""
        try:
            if await served.resolve(model):
                _list_adapter(state, model, served.paths.get(model, os.path.join(served.settings.adapter_dir, model)))
        except AdapterError as exc:
            return exc.status, exc.message
        return None

    def make_generate(inner):
        async def generate(prompt: Any, sampling_params: Any, request_id: str, *args: Any, lora_request: Any = None,
                           **kwargs: Any):
            if not serve_compat.is_adapter_request(lora_request):  # the base model
                if refuses(None, served.base_names):
                    raise serve_compat.not_found_error(served.unknown(served.base_names[0]).message)
                if isinstance(prompt, dict) and prompt.get("cache_salt") is not None:
                    prompt = {**prompt, "cache_salt": base_cache_salt(prompt["cache_salt"])}
                async for output in inner(prompt, sampling_params, request_id, *args, lora_request=lora_request, **kwargs):
                    yield output
                return
            name = lora_request.lora_name
            if refuses(name, served.base_names):  # checked at vLLM's model check already: never reached
                raise serve_compat.not_found_error(served.unknown(name).message)
            if not isinstance(prompt, dict) or not isinstance(prompt.get("prompt_token_ids"), list):
                raise ValueError(f"adapter {name!r}: a PreFT adapter needs a text or token prompt, not "
                                 f"{type(prompt).__name__} input")
            try:
                async with served.serving(name) as entry:
                    if (broken := served.broken_error(entry)) is not None:
                        raise broken
                    first_last = entry.config.first_last
                    spans = [list(span) for span in prompt.get(SAMPLED_SPANS_KEY) or []]  # before tag_request moves them
                    tagged, params = tag_request(prompt, sampling_params, entry.name, entry.version,
                                                 first_last[1] if first_last else 0, not entry.config.prefill_only,
                                                 served.settings.slot_limit)
                    recorder = None
                    tenant = current_tenant.get()
                    if traffic is not None and tenant is not None and tenant.record:
                        params, delta = serve_compat.with_sampled_logprobs(params)
                        recorder = RequestRecorder(engine_request_id=request_id, n=params.n, tenant=tenant.name,
                                                   adapter=entry.name, version=entry.version,
                                                   prompt_ids=prompt["prompt_token_ids"], sampled_spans=spans,
                                                   messages=(request_notes.get() or {}).get("messages"),
                                                   delta=delta)
                    stream = inner(tagged, params, request_id, *args, lora_request=None, **kwargs)
                    try:
                        async for output in stream:
                            if request_failed(output) and (broken := await served.check_failed(entry)) is not None:
                                raise broken  # this request failed alone: no token of it was produced
                            if recorder is not None and not request_failed(output):
                                try:
                                    recorder.add(output)
                                except Exception:  # never the client's problem: this request goes unrecorded
                                    logger.exception("recording response %r failed", recorder.id)
                                    recorder = None
                                if recorder is not None and output.finished:
                                    await record(recorder)  # committed before the client sees the end
                            yield output
                    finally:
                        await stream.aclose()  # an abandoned request is aborted before the adapter is released
            except AdapterError as exc:
                if exc.status == 422:  # the adapter's activations went non-finite
                    raise serve_compat.unprocessable_error(exc.message) from None
                raise serve_compat.not_found_error(exc.message) from None  # unloaded after vLLM's model check

        return generate

    serve_compat.wrap_engine_generate(engine_client, make_generate)
    def render_chat(chat):
        notes = request_notes.get()
        if traffic is not None and notes is not None:
            notes["messages"] = chat.messages  # for the request's traffic record
        return render_adapter_chat(chat, chat.model in served.entries)

    serve_compat.patch_chat_rendering(render_chat)
    serve_compat.patch_responses_check(
        lambda model, items, continues: responses_history_error(model, items, continues) if model in served.entries else None)
    serve_compat.patch_serving_checks(lambda model: served.unknown(model or served.base_names[0]).message, serve_compat.is_adapter_request,
                                      resolve if served.settings.adapter_dir else None,
                                      lambda model: refuses(model, served.base_names))
