"""Trainer state for active tenants only (`tenant_offload='cpu' | 'disk'`, a run with tenants= and tenants_per_step=K).

The model has K rows (adapters) and the optimizer K parameter groups, whatever the tenant count. Before a step the
picked tenants are brought into rows (`TenantRows.bring_in`): a tenant leaving a row has its adapter tensors and
AdamW state (`exp_avg`, `exp_avg_sq`, `step` of each parameter) written to a `TenantStateStore`, a tenant entering
one has them copied in. The copies are exact and AdamW's state is per parameter, so a tenant's trajectory is the one
it has with every tenant in memory. A tenant that never trained has no entry: it starts from the initial adapter
(every tenant starts from the same weights, PreftConfig.seed) with no AdamW state, so registering a tenant costs
nothing until it trains.

Entries are flat {key: tensor} dicts: `<adapter file key>` for the adapter parameters, `<state name>::<adapter file
key>` for the optimizer state. A 'disk' store holds one safetensors file per tenant (written to a temporary name and
renamed, so a crash leaves the previous file whole, and a checkpoint's hard link keeps its own copy).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from preft_rl.adapters.serialization import KEY_PREFIX

STATE_SEPARATOR = "::"
_FILE = re.compile(r"^([A-Za-z0-9_-]{1,64})\.safetensors$")
_PROCESS = re.compile(r"^process-\d+$")


class TenantStateStore:
    """Each tenant's adapter and optimizer tensors while it is not in a row: in host memory ('cpu') or one file per
    tenant in `<root>/process-<process>` ('disk': each training process has its own). A new store starts empty: its
    folder's files of an earlier run are removed."""

    def __init__(self, kind: str, root: str | os.PathLike | None = None, process: int = 0) -> None:
        if kind not in ("cpu", "disk"):
            raise ValueError(f"tenant state store kind {kind!r}: use 'cpu' or 'disk'")
        self.kind = kind
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.directory = None
        if kind == "disk":
            if root is None:
                raise ValueError("a 'disk' tenant state store needs a folder")
            root = Path(root)
            if root.exists() and not root.is_dir():
                raise ValueError(f"tenant_offload_dir {root} is a file; give a folder (it is created if missing)")
            foreign = [p.name for p in root.iterdir() if not _PROCESS.match(p.name)] if root.is_dir() else []
            if foreign:
                raise ValueError(f"tenant_offload_dir {root} holds files that are not tenant state ({foreign[:3]}); give a "
                                 "folder of its own (a run replaces the tenant files in it)")
            self.directory = root / f"process-{process}"
            self._clear_directory()

    def _clear_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in self.directory.iterdir():
            if _FILE.match(path.name.removesuffix(".tmp")):
                path.unlink()

    # ------------------------------------------------------------------------------ entries
    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def __contains__(self, name: str) -> bool:
        return name in self._memory if self.kind == "cpu" else self._path(name).is_file()

    def names(self) -> list[str]:
        """The tenants with an entry (those that have trained), sorted."""
        if self.kind == "cpu":
            return sorted(self._memory)
        return sorted(m.group(1) for p in self.directory.iterdir() if (m := _FILE.match(p.name)))

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tenant's tensors (on CPU), or None if it has no entry."""
        if self.kind == "cpu":
            return self._memory.get(name)
        path = self._path(name)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in tensors.items()}
        if self.kind == "cpu":
            self._memory[name] = tensors
            return
        from safetensors.torch import save_file

        tmp = self._path(name).with_name(f"{name}.safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self._path(name))

    def nbytes(self) -> int:
        """Bytes the entries take (host memory for 'cpu', files for 'disk')."""
        if self.kind == "cpu":
            return sum(t.numel() * t.element_size() for entry in self._memory.values() for t in entry.values())
        return sum(self._path(name).stat().st_size for name in self.names())

    # ------------------------------------------------------------------------------ checkpoints
    def save_to(self, directory: Path) -> None:
        """Every entry as <directory>/<name>.safetensors. A 'disk' store hard-links its files (a later write replaces
        the store's file, never the linked one), copying where links are not possible."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "cpu":
            from safetensors.torch import save_file

            for name, tensors in self._memory.items():
                save_file(tensors, str(directory / f"{name}.safetensors"))
            return
        for name in self.names():
            _link_or_copy(self._path(name), directory / f"{name}.safetensors")

    def load_from(self, directory: Path, entries: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Replace every entry by a checkpoint's (checked by the caller first: `read_checkpoint_entries`); `entries` are
        the tensors it read (kept as they are by a 'cpu' store)."""
        if self.kind == "cpu":
            self._memory = dict(entries or {})
            return
        self._clear_directory()
        for path in sorted(directory.iterdir()):
            if _FILE.match(path.name):
                _link_or_copy(path, self.directory / path.name)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no copy; a later atomic write to either name leaves the other as it was), or a copy where links
    are not possible (another file system)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def read_checkpoint_entries(directory: Path, tenant_names: set[str], check: Any, keep: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Read and check every tenant file of a checkpoint's tenant_state/ folder (`check(name, tensors)` raises on a bad
    one); returns the tensors if `keep`, else an empty dict (a 'disk' store links the files instead)."""
    from safetensors.torch import load_file

    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing")
    entries = {}
    for path in sorted(directory.iterdir()):
        match = _FILE.match(path.name)
        if not match or match.group(1) not in tenant_names:
            raise ValueError(f"{path.name} is not the state file of one of this run's tenants")
        tensors = load_file(str(path))
        check(match.group(1), tensors)
        if keep:
            entries[match.group(1)] = tensors
    return entries


class TenantRows:
    """Which tenant each of the model's K rows holds, and the moves between rows and the store.

    `adapter(row)` is row `row`'s adapter in the TenantPreftModel (adapter_named_parameters gives (file key, param));
    `optimizer` holds the rows' parameters (its `state` is read each time: load_state_dict replaces it). `initial` holds the adapter every tenant starts
    from ({file key: tensor}). A row is dirty when its tenant changed (trained) since it was brought in."""

    def __init__(self, row_names: list[str], adapter: Any, optimizer: Any, store: TenantStateStore,
                 initial: dict[str, torch.Tensor]) -> None:
        self.row_names, self._adapter, self._optimizer, self.store = row_names, adapter, optimizer, store
        self.initial = {key: tensor.detach().to("cpu", copy=True) for key, tensor in initial.items()}
        self.tenants: list[str | None] = [None] * len(row_names)
        self.dirty: set[str] = set()
        self.loads = 0  # tenants brought in from the store or the initial adapter, over the run

    def __iter__(self) -> Iterator[str]:
        return (name for name in self.tenants if name is not None)

    def row_of(self, name: str) -> str:
        return self.row_names[self.tenants.index(name)]

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        """A tenant's adapter tensors as last written back ({file key: tensor}; the initial adapter if it never trained)."""
        entry = self.store.get(name)
        return self.initial if entry is None else {k: v for k, v in entry.items() if STATE_SEPARATOR not in k}

    def params(self, row: int) -> list[tuple[str, torch.nn.Parameter]]:
        return [(KEY_PREFIX + key, param) for key, param in self._adapter(self.row_names[row]).adapter_named_parameters()]

    def bring_in(self, names: list[str]) -> list[int]:
        """Put these tenants (at most K) into rows: tenants in rows that are not wanted are written back (if dirty) and
        leave; the others come in. Returns the rows that got a tenant."""
        if len(names) > len(self.tenants):
            raise ValueError(f"{len(names)} tenants do not fit {len(self.tenants)} rows")
        wanted = set(names)
        for row, name in enumerate(self.tenants):
            if name is not None and name not in wanted:
                self.write_back(row)
                self.tenants[row] = None
        loaded = []
        for name in names:
            if name not in self.tenants:
                row = self.tenants.index(None)
                self._load(row, name)
                loaded.append(row)
        return loaded

    def write_back(self, row: int) -> None:
        """Row `row`'s tenant's adapter and optimizer state into the store, if it changed since it came in."""
        name = self.tenants[row]
        if name is None or name not in self.dirty:
            return
        entry = {}
        for key, param in self.params(row):
            entry[key] = param.detach()
            for state_name, value in self._optimizer.state.get(param, {}).items():
                entry[f"{state_name}{STATE_SEPARATOR}{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        self.store.put(name, entry)
        self.dirty.discard(name)

    def flush(self) -> None:
        """Write every dirty row back; the rows keep their tenants (a checkpoint then has all of the store)."""
        for row in range(len(self.tenants)):
            self.write_back(row)

    def clear(self) -> None:
        """Forget the rows' tenants without writing them back (after the store was replaced by a checkpoint's)."""
        for row in range(len(self.tenants)):
            for _, param in self.params(row):
                self._optimizer.state.pop(param, None)
        self.tenants = [None] * len(self.tenants)
        self.dirty.clear()

    def _load(self, row: int, name: str) -> None:
        entry = self.store.get(name)
        states: dict[str, dict[str, torch.Tensor]] = {}  # {file key: {state name: tensor}}
        for full_key, value in (entry or {}).items():
            if STATE_SEPARATOR in full_key:
                state_name, key = full_key.split(STATE_SEPARATOR, 1)
                states.setdefault(key, {})[state_name] = value
        with torch.no_grad():
            for key, param in self.params(row):
                param.copy_((entry if entry is not None else self.initial)[key].to(param.device, param.dtype))
                if state := states.get(key):  # AdamW keeps `step` on the CPU (not capturable, not fused) and the moments by the parameter
                    self._optimizer.state[param] = {k: v.clone() if k == "step" else v.to(param.device, copy=True) for k, v in state.items()}
                else:
                    self._optimizer.state.pop(param, None)
        self.tenants[row] = name
        self.loads += 1


class StoredAdapter:
    """A tenant's adapter from its stored tensors ({file key: tensor}), as the serialization functions see a PreftModel
    (adapter_state_dict, save_pretrained)."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: Any, base_model: Any) -> None:
        self._tensors = {key: value for key, value in tensors.items() if STATE_SEPARATOR not in key}
        self.preft_config, self.base_model = config, base_model

    def adapter_named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in self._tensors.items():
            yield key[len(KEY_PREFIX):], tensor

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from preft_rl.adapters.serialization import adapter_state_dict

        return adapter_state_dict(self)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from preft_rl.adapters.serialization import save_adapter

        save_adapter(self, save_directory)
