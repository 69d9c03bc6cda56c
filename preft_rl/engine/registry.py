"""The engine's adapter registry: named adapters in stacked, slot-indexed tensors.

Every adapter occupies one slot; all adapters of an engine share one method and are zero-padded to
`max_rank` (zero rows/columns add exactly 0.0, so padding never changes a result). Capacity grows on
demand by doubling, up to `max_adapters`. The tensors' layout, staging and writing belong to the method
(`AdapterMethod.engine_*`, preft_rl/adapters/methods); this file keeps the method-free bookkeeping: slots,
versions, validation order, per-slot position windows. A method may ask for an extended tensor set (ReFT's
separate 'last' interventions, "last.<name>"), allocated when the first adapter that needs it arrives. Adapters arrive in the file format that
`PreftModel.save_pretrained` writes (see preft_rl/adapters/serialization.py) and are validated fully
(config, every expected tensor present, shapes, finite in the engine's dtype) before any slot is touched,
so a refused adapter leaves the engine as it was.

Versions key the engine's prefix cache, so a name's version never repeats: removing "x" and adding "x"
again continues from the removed version instead of restarting at 1.

Slots as a cache (`max_registered > max_adapters`): more adapters may be registered than there are slots. Every
adapter is validated when it is added or updated, as always, and its staged tensors are kept in host memory; an
adapter without a slot waits there. `make_resident(names)` gives the named adapters slots before a step that needs
them, evicting the least recently used adapters the step does not need. An adapter's version is its weights' version,
whether it sits in a slot or on the host, so a reloaded adapter keeps its prefix-cache key and an updated one gets a new
one. Without caching (the default) nothing of this runs and the slots hold every adapter, as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from preft_rl.adapters.config import SCOPES, PreftConfig
from preft_rl.adapters.methods import get_method

from . import vllm_compat

# vLLM's fused linear modules of a decoder layer -> the HF modules each fuses, in output-slice order (vllm_compat's)
LORA_TARGETS = vllm_compat.FUSED_LINEAR_MODULES
NO_LIMIT = np.iinfo(np.int64).max // 4


ROW_PARALLEL = vllm_compat.ROW_PARALLEL_MODULES  # their input is sharded and vLLM all-reduces their output


@dataclass(frozen=True)
class ModelShape:
    """What the registry needs to know about the base model (from its HF config), and which tensor-parallel rank
    holds it. `lora_io` gives this rank's sizes, `lora_io_full` the whole model's; adapters arrive whole and each rank
    keeps its shard, as vLLM shards its own multi-LoRA (vllm/lora/layers/): column-parallel qkv and gate_up keep
    this rank's output rows of B (k/v by KV head, replicated when there are fewer KV heads than ranks), row-parallel
    o_proj and down_proj keep this rank's input columns of A."""

    num_layers: int
    hidden: int
    q_size: int
    kv_size: int
    intermediate: int
    head_dim: int = 0
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def fused_linear(self) -> dict[str, tuple[str, ...]]:
        """vLLM's fused linear modules of a decoder layer and the HF modules each fuses (in output-slice order)."""
        return LORA_TARGETS

    @property
    def row_parallel(self) -> tuple[str, ...]:
        """The fused modules whose input is sharded over TP ranks (vLLM all-reduces their output)."""
        return ROW_PARALLEL

    @staticmethod
    def from_hf_config(config, tp_rank: int = 0, tp_size: int = 1) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = ModelShape(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            q_size=config.num_attention_heads * head_dim,
            kv_size=config.num_key_value_heads * head_dim,
            intermediate=config.intermediate_size,
            head_dim=head_dim,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        if tp_size > 1:
            heads = config.num_attention_heads
            if heads % tp_size or config.intermediate_size % tp_size or not (
                    config.num_key_value_heads % tp_size == 0 or tp_size % config.num_key_value_heads == 0):
                raise ValueError(f"tensor_parallel_size={tp_size} must divide the model's {heads} attention heads and "
                                 f"{config.intermediate_size} MLP rows, and divide or be a multiple of its "
                                 f"{config.num_key_value_heads} KV heads")
        return shape

    def _kv_shard(self) -> tuple[int, int]:
        """(first row, rows) of this rank's k (or v) output."""
        kv_heads = self.kv_size // self.head_dim if self.head_dim else 1
        if self.tp_size <= kv_heads:
            rows = self.kv_size // self.tp_size
            return self.tp_rank * rows, rows
        replicas = self.tp_size // kv_heads  # several ranks hold the same KV head
        return (self.tp_rank // replicas) * self.head_dim, self.head_dim

    def lora_io_full(self, vllm_module: str) -> tuple[int, tuple[int, ...]]:
        """(d_in, output slice sizes) of a fused vLLM module in the whole model."""
        return {
            "self_attn.qkv_proj": (self.hidden, (self.q_size, self.kv_size, self.kv_size)),
            "self_attn.o_proj": (self.q_size, (self.hidden,)),
            "mlp.gate_up_proj": (self.hidden, (self.intermediate, self.intermediate)),
            "mlp.down_proj": (self.intermediate, (self.hidden,)),
        }[vllm_module]

    def lora_io(self, vllm_module: str) -> tuple[int, tuple[int, ...]]:
        """(d_in, output slice sizes) of a fused vLLM module on this rank."""
        t = self.tp_size
        kv = self._kv_shard()[1]
        return {
            "self_attn.qkv_proj": (self.hidden, (self.q_size // t, kv, kv)),
            "self_attn.o_proj": (self.q_size // t, (self.hidden,)),
            "mlp.gate_up_proj": (self.hidden, (self.intermediate // t, self.intermediate // t)),
            "mlp.down_proj": (self.intermediate // t, (self.hidden,)),
        }[vllm_module]

    def output_shard(self, vllm_module: str, index: int) -> tuple[int, int]:
        """(first row, rows) of this rank's part of output slice `index` of a column-parallel fused module."""
        if vllm_module == "self_attn.qkv_proj" and index > 0:
            return self._kv_shard()
        rows = self.lora_io(vllm_module)[1][index]
        return self.tp_rank * rows, rows


@dataclass
class AdapterEntry:
    name: str
    slot: int  # -1: registered, waiting in host memory for a slot (slots as a cache)
    version: int
    rank: int
    config: PreftConfig
    keys: frozenset[str] = field(default=frozenset(), repr=False)  # the file-format keys the engine uses; an update must give exactly these


def check_is_state(name: str, state: Any) -> None:
    if not isinstance(state, dict):
        raise TypeError(f"adapter {name!r}: the state must be a dict of tensors, got {type(state).__name__}")


def check_is_tensor(name: str, key: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"adapter {name!r}: tensor {key} is a {type(tensor).__name__}; pass torch tensors (torch.as_tensor(x))")


def _host_copy(staged: Any) -> Any:
    """Staged tensors copied to host memory (the slots-as-a-cache copy an adapter is reloaded from)."""
    if isinstance(staged, torch.Tensor):
        return staged.detach().to("cpu", copy=True)
    if isinstance(staged, dict):
        return {key: _host_copy(value) for key, value in staged.items()}
    if isinstance(staged, (list, tuple)):
        return type(staged)(_host_copy(value) for value in staged)
    return staged


def unknown_adapter_message(name: str, registered: list[str]) -> str:
    known = sorted(registered)
    return f"unknown adapter {name!r}; registered: {known[:10]}{' ...' if len(known) > 10 else ''} (add_adapter first)"


class AdapterRegistry:
    def __init__(
        self, method: str, shape: ModelShape, max_adapters: int, max_rank: int, dtype: torch.dtype, device: torch.device,
        adapter_scope: str = "prompt", max_registered: int | None = None,
    ) -> None:
        self.spec = get_method(method)  # refuses an unknown method, naming the registered ones
        if adapter_scope not in SCOPES:
            raise ValueError(f"adapter_scope={adapter_scope!r}: use one of {SCOPES}")
        self.adapter_scope = adapter_scope  # every adapter added must have this scope (the hooks apply one rule)
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"max_adapters={max_adapters} and max_rank={max_rank} must both be >= 1")
        self.method, self.shape, self.max_adapters, self.max_rank = method, shape, max_adapters, max_rank
        self.max_registered = max_adapters if max_registered is None else max_registered
        if self.max_registered < max_adapters:
            raise ValueError(f"max_cpu_adapters={self.max_registered} must be >= max_adapters={max_adapters} (it counts "
                             "every registered adapter, those in slots included)")
        self.dtype, self.device = dtype, device
        self.entries: dict[str, AdapterEntry] = {}
        # slots as a cache: every adapter's staged tensors in host memory, and the resident ones by last use (oldest first)
        self.host: dict[str, tuple[Any, PreftConfig]] = {}
        self.recent: dict[str, None] = {}
        self.loads = 0  # adapters written into a slot from the host cache (a miss), for reports and tests
        self._removed_versions: dict[str, int] = {}  # last version of a removed name: a re-add continues from it
        self._broken: dict[str, int] = {}  # name -> the version whose activations went non-finite (its requests fail)
        self.capacity = 0
        self.tensors: dict[str, torch.Tensor] = {}
        # per-slot host-side facts used to build each step's token selection
        self.first_n = np.zeros(0, dtype=np.int64)
        self.last_m = np.zeros(0, dtype=np.int64)
        self.layer_mask = np.zeros((0, shape.num_layers), dtype=bool)
        self.split = np.zeros(0, dtype=bool)  # the slot uses the method's extended set (ReFT: separate 'last')
        self.has_last_set = False  # the method's extended tensors ("last.*") exist
        self._grow(min(8, max_adapters))

    # ------------------------------------------------------------------------------ sizes
    def _tensor_shapes(self, capacity: int) -> dict[str, tuple[int, ...]]:
        return self.spec.engine_tensor_shapes(self.shape, self.max_rank, capacity, self.has_last_set)

    def bytes_per_adapter(self) -> int:
        """Bytes of one slot (ReFT: doubles once an adapter with separate first/last interventions is added)."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return sum(int(np.prod(shape)) for shape in self._tensor_shapes(1).values()) * elem

    def _grow(self, capacity: int) -> None:
        capacity = min(capacity, self.max_adapters)
        new = {}
        for key, shape in self._tensor_shapes(capacity).items():
            tensor = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if key in self.tensors:
                old = self.tensors[key]
                slot_dim = self.spec.engine_slot_dim
                tensor.narrow(slot_dim, 0, old.shape[slot_dim]).copy_(old)
            new[key] = tensor
        self.tensors = new
        pad = capacity - self.capacity
        self.first_n = np.concatenate([self.first_n, np.zeros(pad, dtype=np.int64)])
        self.last_m = np.concatenate([self.last_m, np.zeros(pad, dtype=np.int64)])
        self.layer_mask = np.concatenate([self.layer_mask, np.zeros((pad, self.shape.num_layers), dtype=bool)])
        self.split = np.concatenate([self.split, np.zeros(pad, dtype=bool)])
        self.capacity = capacity

    # -------------------------------------------------------------------------- public API
    @property
    def caching(self) -> bool:
        """Whether more adapters may be registered than there are slots (slots as a cache)."""
        return self.max_registered > self.max_adapters

    def add(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> AdapterEntry:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name {name!r} must be a non-empty string")
        if name in self.entries:
            raise ValueError(f"adapter {name!r} is already registered; use update_adapter({name!r}, state_dict) or remove it first")
        if len(self.entries) >= self.max_registered:
            more = "max_cpu_adapters" if self.caching else "max_adapters (or max_cpu_adapters, to keep more in host memory)"
            raise ValueError(
                f"the registry is full ({self.max_registered} adapters); remove_adapter() one or start the engine "
                f"with a larger {more}"
            )
        staged, keys = self._stage(name, state, config)  # validates everything before touching a slot
        version = self._removed_versions.get(name, 0) + 1  # never a version this name had before
        slot = self._free_slot()
        entry = AdapterEntry(name=name, slot=-1 if slot is None else slot, version=version, rank=config.r, config=config,
                             keys=keys)
        if self.caching:
            self.host[name] = (_host_copy(staged), config)
        if slot is not None:
            self._write(slot, staged, config)
            self.recent[name] = None
        self.entries[name] = entry
        return entry

    def update(self, name: str, state: dict[str, torch.Tensor]) -> AdapterEntry:
        entry = self.get(name)
        staged, _ = self._stage(name, state, entry.config, expected=entry.keys)
        self._store(entry, staged, entry.config)
        entry.version += 1
        return entry

    def replace(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> AdapterEntry:
        """New tensors and a new config (rank, targets, positions) for a registered name, in its own slot; the
        version goes up. Everything is validated before the slot is touched: a refused adapter leaves the old one."""
        entry = self.get(name)
        staged, keys = self._stage(name, state, config)
        self._store(entry, staged, config)
        entry.version += 1
        entry.config, entry.rank, entry.keys = config, config.r, keys
        return entry

    def remove(self, name: str) -> None:
        entry = self.get(name)
        if entry.slot >= 0:
            self._write(entry.slot, None, entry.config)
        del self.entries[name]
        self.host.pop(name, None)
        self.recent.pop(name, None)
        self._removed_versions[name] = entry.version

    def _store(self, entry: AdapterEntry, staged: Any, config: PreftConfig) -> None:
        """New validated tensors for a registered adapter: in its slot if it has one, and in the host cache."""
        if self.caching:
            self.host[entry.name] = (_host_copy(staged), config)
        if entry.slot >= 0:
            self._write(entry.slot, staged, config)

    def _free_slot(self) -> int | None:
        used = {e.slot for e in self.entries.values() if e.slot >= 0}
        slot = next((i for i in range(self.max_adapters) if i not in used), None)
        if slot is not None and slot >= self.capacity:
            self._grow(max(2 * self.capacity, slot + 1))
        return slot

    def make_resident(self, names: set[str] | list[str]) -> int:
        """Give each named adapter a slot (slots as a cache): one waiting in host memory is written into a free slot,
        or into the slot of the least recently used adapter not named (which goes back to waiting). Returns how many
        were loaded. Raises when more adapters are named than there are slots."""
        names = [name for name in dict.fromkeys(names) if name in self.entries]
        if len(names) > self.max_adapters:
            raise ValueError(f"{len(names)} adapters are needed in one step but the engine has {self.max_adapters} slots "
                             "(max_adapters); the scheduler's slot limit (vllm_compat.install_adapter_slot_limit) "
                             "should have held some back")
        loaded, needed = 0, set(names)
        for name in names:
            entry = self.entries[name]
            if entry.slot < 0:
                slot = self._free_slot()
                if slot is None:
                    victim = next(n for n in self.recent if n not in needed)  # the least recently used, not needed now
                    slot, self.entries[victim].slot = self.entries[victim].slot, -1
                    del self.recent[victim]
                staged, config = self.host[name]
                self._write(slot, staged, config)
                entry.slot = slot
                loaded += 1
            self.recent.pop(name, None)
            self.recent[name] = None  # most recently used last
        self.loads += loaded
        return loaded

    def mark_broken(self, name: str) -> None:
        """The current version of `name` produced non-finite activations: its requests fail until an update or removal."""
        self._broken[name] = self.get(name).version

    def is_broken(self, name: str) -> bool:
        entry = self.entries.get(name)
        return entry is not None and self._broken.get(name) == entry.version

    def broken(self) -> dict[str, int]:
        """{name: version} of the adapters whose current version is broken."""
        return {name: version for name, version in self._broken.items() if self.is_broken(name)}

    def get(self, name: str) -> AdapterEntry:
        if name not in self.entries:
            raise KeyError(unknown_adapter_message(name, list(self.entries)))
        return self.entries[name]

    # ----------------------------------------------------------------------- validation
    def _stage(
        self, name: str, state: dict[str, torch.Tensor], config: PreftConfig, expected: frozenset[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
        """Validated tensors by internal key, and the file keys they came from. `expected`: the keys an
        update must give (those of the registered adapter); else the keys the config describes."""
        if not isinstance(config, PreftConfig):
            raise TypeError(f"adapter {name!r}: config must be a PreftConfig, got {type(config).__name__}")
        PreftConfig(**dataclasses.asdict(config))  # fields may have been changed since construction: check again
        if config.method != self.method:
            raise ValueError(f"adapter {name!r} is {config.method!r} but this engine serves {self.method!r} adapters")
        if config.adapter_scope != self.adapter_scope:
            raise ValueError(
                f"adapter {name!r} has adapter_scope={config.adapter_scope!r} but this engine applies adapters with "
                f"adapter_scope={self.adapter_scope!r}; serve it from an engine started with adapter_scope={config.adapter_scope!r}"
            )
        if config.r > self.max_rank:
            raise ValueError(
                f"adapter {name!r} has rank {config.r} but the engine was started with max_rank={self.max_rank}; "
                f"start it with max_rank>={config.r}"
            )
        self.spec.engine_check_config(name, config, self.dtype)
        check_is_state(name, state)
        staged, keys = self.spec.engine_stage(name, state, config, self.shape, lambda key, t, want: self._check(name, key, t, want))
        if expected is None:
            expected = self.spec.engine_expected_keys(config, self.shape)
        if expected is None:  # the config alone cannot say (e.g. LoRA on module names this engine does not know)
            expected = keys
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        if missing:
            raise ValueError(
                f"adapter {name!r}: missing {len(missing)} tensors, e.g. {missing[:3]}; pass every tensor of the "
                "adapter (PreftModel.adapter_state_dict() gives them all): a missing one would silently be zero"
            )
        if extra:
            raise ValueError(
                f"adapter {name!r}: {len(extra)} tensors are not part of this adapter, e.g. {extra[:3]}; "
                "its config (target_modules, layers, positions) does not describe them"
            )
        return staged, keys

    def _check(self, name: str, key: str, tensor: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
        check_is_tensor(name, key, tensor)
        if not tensor.is_floating_point():
            raise TypeError(f"adapter {name!r}: tensor {key} has dtype {tensor.dtype}; adapter weights are floating point "
                            "(an integer tensor would be served silently rounded): pass the float tensors the adapter was saved with")
        if tuple(tensor.shape) != want:
            raise ValueError(f"adapter {name!r}: tensor {key} has shape {tuple(tensor.shape)}, expected {want} for this base model")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"adapter {name!r}: tensor {key} has non-finite values (NaN or inf); the adapter is broken: fix or retrain it")
        if not torch.isfinite(tensor.to(self.dtype)).all():  # what the engine would hold: finite fp32 may overflow fp16
            raise ValueError(
                f"adapter {name!r}: tensor {key} has values up to {tensor.abs().max().item():.3g} that overflow the "
                f"engine's {self.dtype}; rescale the adapter or start the engine with a wider dtype"
            )
        return tensor

    # --------------------------------------------------------------------------- writing
    def _write(self, slot: int, staged: dict | None, config: PreftConfig) -> None:
        """Zero the slot, then copy the staged tensors in (None: leave it zero)."""
        extended = staged is not None and self.spec.engine_extended(config)
        if extended and not self.has_last_set:
            self.has_last_set = True
            self._grow(self.capacity)  # same capacity: adds the method's zero extended tensors
        with torch.no_grad():
            for tensor in self.tensors.values():
                tensor.select(self.spec.engine_slot_dim, slot).zero_()
            self.layer_mask[slot] = False
            if staged is not None:
                self.layer_mask[slot] = self.spec.engine_write(self.tensors, slot, staged, config, self.shape, self.max_rank)
        self.split[slot] = extended
        first_last = config.first_last
        self.first_n[slot] = NO_LIMIT if first_last is None else first_last[0]
        self.last_m[slot] = 0 if first_last is None else first_last[1]
