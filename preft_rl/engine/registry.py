"""The engine's adapter registry: named adapters in stacked, slot-indexed tensors.

Every adapter occupies one slot; all adapters of an engine share one method and are zero-padded to
`max_rank` (zero rows/columns add exactly 0.0, so padding never changes a result). Capacity grows on
demand by doubling, up to `max_adapters`. A ReFT adapter with separate first/last interventions
(share_first_last=False) keeps its 'first' intervention in the main tensors and its 'last' one in a
second set ("last.<name>"), allocated when the first such adapter arrives. Adapters arrive in the file format that
`PreftModel.save_pretrained` writes (see preft_rl/adapters/serialization.py) and are validated fully
(config, every expected tensor present, shapes, finite in the engine's dtype) before any slot is touched,
so a refused adapter leaves the engine as it was.

Versions key the engine's prefix cache, so a name's version never repeats: removing "x" and adding "x"
again continues from the removed version instead of restarting at 1.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from preft_rl.adapters.config import PreftConfig

# HF module name -> (vLLM module path inside a decoder layer, slice index in the fused output)
LORA_TARGETS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])\.weight$")
_REFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.preft_reft\.interventions\.(\w+)\."
    r"(rotate_layer\.weight|rotate_layer\.raw|learned_source\.weight|learned_source\.bias|proj_layer\.weight)$"
)
NO_LIMIT = np.iinfo(np.int64).max // 4


ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")  # their input is sharded and vLLM all-reduces their output


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

    def shard(self, vllm_module: str, which: str, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole LoRA tensor: A (r, d_in) or B (d_out of slice `index`, r)."""
        if self.tp_size == 1:
            return tensor
        d_in, slices = self.lora_io(vllm_module)
        if which == "A":
            if vllm_module not in ROW_PARALLEL:
                return tensor  # column-parallel layers see the whole input
            return tensor[:, self.tp_rank * d_in : (self.tp_rank + 1) * d_in]
        if vllm_module in ROW_PARALLEL:
            return tensor  # row-parallel layers produce the whole output (after the all-reduce)
        if vllm_module == "self_attn.qkv_proj" and index > 0:
            start, rows = self._kv_shard()
            return tensor[start : start + rows]
        rows = slices[index]
        return tensor[self.tp_rank * rows : (self.tp_rank + 1) * rows]


@dataclass
class AdapterEntry:
    name: str
    slot: int
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


def unknown_adapter_message(name: str, registered: list[str]) -> str:
    known = sorted(registered)
    return f"unknown adapter {name!r}; registered: {known[:10]}{' ...' if len(known) > 10 else ''} (add_adapter first)"


class AdapterRegistry:
    def __init__(
        self, method: str, shape: ModelShape, max_adapters: int, max_rank: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if method not in ("lora", "loreft", "direft"):
            raise ValueError(f"method={method!r}: use 'lora', 'loreft' or 'direft'")
        if max_adapters < 1 or max_rank < 1:
            raise ValueError(f"max_adapters={max_adapters} and max_rank={max_rank} must both be >= 1")
        self.method, self.shape, self.max_adapters, self.max_rank = method, shape, max_adapters, max_rank
        self.dtype, self.device = dtype, device
        self.entries: dict[str, AdapterEntry] = {}
        self._removed_versions: dict[str, int] = {}  # last version of a removed name: a re-add continues from it
        self.capacity = 0
        self.tensors: dict[str, torch.Tensor] = {}
        # per-slot host-side facts used to build each step's token selection
        self.first_n = np.zeros(0, dtype=np.int64)
        self.last_m = np.zeros(0, dtype=np.int64)
        self.layer_mask = np.zeros((0, shape.num_layers), dtype=bool)
        self.split = np.zeros(0, dtype=bool)  # ReFT: the slot has separate first/last interventions
        self.has_last_set = False  # the "last.*" tensors exist
        self._grow(min(8, max_adapters))

    # ------------------------------------------------------------------------------ sizes
    def _tensor_shapes(self, capacity: int) -> dict[str, tuple[int, ...]]:
        R, s = self.max_rank, self.shape
        shapes = {}
        if self.method == "lora":
            for layer in range(s.num_layers):
                for module in LORA_TARGETS:
                    d_in, slices = s.lora_io(module)
                    shapes[f"{layer}.{module}.A"] = (capacity, len(slices) * R, d_in)
                    shapes[f"{layer}.{module}.B"] = (capacity, sum(slices), R)
            shapes["scaling"] = (capacity,)
        else:
            names = ("rotate", "source_w", "source_b") if self.method == "loreft" else ("source_w", "source_b", "proj")
            for prefix in ("", "last.") if self.has_last_set else ("",):
                for name in names:
                    shapes[prefix + name] = (s.num_layers, capacity, R) if name == "source_b" else (s.num_layers, capacity, R, s.hidden)
        return shapes

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
                slot_dim = 1 if self.method != "lora" else 0
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
    def add(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> AdapterEntry:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name {name!r} must be a non-empty string")
        if name in self.entries:
            raise ValueError(f"adapter {name!r} is already registered; use update_adapter({name!r}, state_dict) or remove it first")
        if len(self.entries) >= self.max_adapters:
            raise ValueError(
                f"the registry is full ({self.max_adapters} adapters); remove_adapter() one or start the engine "
                f"with max_adapters>{self.max_adapters}"
            )
        staged, keys = self._stage(name, state, config)  # validates everything before touching a slot
        used = {e.slot for e in self.entries.values()}
        slot = next(i for i in range(self.max_adapters) if i not in used)
        if slot >= self.capacity:
            self._grow(2 * self.capacity)
        version = self._removed_versions.get(name, 0) + 1  # never a version this name had before
        entry = AdapterEntry(name=name, slot=slot, version=version, rank=config.r, config=config, keys=keys)
        self._write(slot, staged, config)
        self.entries[name] = entry
        return entry

    def update(self, name: str, state: dict[str, torch.Tensor]) -> AdapterEntry:
        entry = self.get(name)
        staged, _ = self._stage(name, state, entry.config, expected=entry.keys)
        self._write(entry.slot, staged, entry.config)
        entry.version += 1
        return entry

    def replace(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> AdapterEntry:
        """New tensors and a new config (rank, targets, positions) for a registered name, in its own slot; the
        version goes up. Everything is validated before the slot is touched: a refused adapter leaves the old one."""
        entry = self.get(name)
        staged, keys = self._stage(name, state, config)
        self._write(entry.slot, staged, config)
        entry.version += 1
        entry.config, entry.rank, entry.keys = config, config.r, keys
        return entry

    def remove(self, name: str) -> None:
        entry = self.get(name)
        self._write(entry.slot, None, entry.config)
        del self.entries[name]
        self._removed_versions[name] = entry.version

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
        if config.r > self.max_rank:
            raise ValueError(
                f"adapter {name!r} has rank {config.r} but the engine was started with max_rank={self.max_rank}; "
                f"start it with max_rank>={config.r}"
            )
        if config.is_lora and not torch.isfinite(torch.tensor(config.scaling, dtype=self.dtype)):
            raise ValueError(
                f"adapter {name!r}: LoRA scaling alpha / r = {config.scaling} is not finite in {self.dtype} "
                f"(alpha={config.alpha}, r={config.r}); use a finite alpha such as alpha={2 * config.r}"
            )
        check_is_state(name, state)
        stage = self._stage_lora if config.is_lora else self._stage_reft
        staged, keys = stage(name, state, config)
        if expected is None:
            expected = self._expected_keys(config)
        if expected is None:  # LoRA on modules the config cannot name here: at least every A needs its B
            expected = frozenset(k[: -len("A.weight")] + ab + ".weight" for k in keys for ab in "AB")
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

    def _expected_keys(self, config: PreftConfig) -> frozenset[str] | None:
        """The file keys `config` describes on this model; None where the config alone cannot say."""
        layers = range(self.shape.num_layers)
        if config.is_lora:
            # Every (layer, module) by its full name in the HF model, matched as PreftModel matches target_modules:
            # short names ('q_proj', 'self_attn.q_proj') and PEFT's full paths ('model.layers.0.mlp.down_proj') alike.
            full = {(i, m): f"model.layers.{i}.{m}" for i in layers for hfs in LORA_TARGETS.values() for m in hfs}
            if config.target_modules != "all-linear":
                hit = lambda name, t: name == t or name.endswith("." + t)  # noqa: E731 - PreftModel's matching rule
                if not all(any(hit(name, t) for name in full.values()) for t in config.target_modules):
                    return None  # a name this engine does not know: the tensors alone define the adapter
                full = {key: name for key, name in full.items() if any(hit(name, t) for t in config.target_modules)}
            return frozenset(f"base_model.model.model.layers.{i}.{m}.lora_{ab}.weight" for (i, m) in full for ab in "AB")
        if config.layers != "all":
            layers = config.layers
        parts = ("rotate_layer.weight", "learned_source.weight", "learned_source.bias") if self.method == "loreft" else (
            "learned_source.weight", "learned_source.bias", "proj_layer.weight")
        return frozenset(
            f"base_model.model.model.layers.{i}.preft_reft.interventions.{group}.{part}"
            for i in layers for group in config.intervention_groups for part in parts
        )

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

    def _stage_lora(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> tuple[dict, frozenset[str]]:
        r, s = config.r, self.shape
        hf_to_vllm = {hf: (vm, i) for vm, hfs in LORA_TARGETS.items() for i, hf in enumerate(hfs)}
        staged: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            match = _LORA_KEY.match(key)
            if not match or int(match.group(1)) >= s.num_layers or match.group(2) not in hf_to_vllm:
                raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} for a LoRA adapter on this {s.num_layers}-layer model")
            layer, hf_module, which = int(match.group(1)), match.group(2), match.group(3)
            vllm_module, index = hf_to_vllm[hf_module]
            d_in, slices = s.lora_io_full(vllm_module)
            want = (r, d_in) if which == "A" else (slices[index], r)
            checked = self._check(name, key, tensor, want)
            staged[f"{layer}.{vllm_module}.{which}.{index}"] = s.shard(vllm_module, which, index, checked)
        if not staged:
            raise ValueError(f"adapter {name!r}: no LoRA tensors found (keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)")
        return staged, frozenset(state)

    def _stage_reft(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> tuple[dict, frozenset[str]]:
        r, s = config.r, self.shape
        wanted = {"learned_source.weight": (r, s.hidden), "learned_source.bias": (r,)}
        wanted.update({"rotate_layer.weight": (r, s.hidden)} if self.method == "loreft" else {"proj_layer.weight": (r, s.hidden)})
        groups = config.intervention_groups  # ("shared",) or ("first", "last")
        staged: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            match = _REFT_KEY.match(key)
            if not match or int(match.group(1)) >= s.num_layers or match.group(2) not in groups:
                raise ValueError(
                    f"adapter {name!r}: unexpected tensor {key!r} for a {self.method} adapter with interventions "
                    f"{list(groups)} on this {s.num_layers}-layer model"
                )
            if match.group(3) == "rotate_layer.raw":
                continue  # the free parameter of R; the engine uses the materialised R
            if match.group(3) not in wanted:
                raise ValueError(f"adapter {name!r}: tensor {key!r} does not belong to a {self.method} adapter")
            staged[f"{match.group(2)}.{match.group(1)}.{match.group(3)}"] = self._check(name, key, tensor, wanted[match.group(3)])
        if not staged:
            raise ValueError(f"adapter {name!r}: no {self.method} tensors found")
        return staged, frozenset(k for k in state if not k.endswith(".rotate_layer.raw"))

    # --------------------------------------------------------------------------- writing
    def _write(self, slot: int, staged: dict | None, config: PreftConfig) -> None:
        """Zero the slot, then copy the staged tensors in (None: leave it zero)."""
        R = self.max_rank
        with torch.no_grad():
            if self.method == "lora":
                for key, tensor in self.tensors.items():
                    if key != "scaling":
                        tensor[slot].zero_()
                self.tensors["scaling"][slot] = 0.0 if staged is None else config.scaling
                for key, value in (staged or {}).items():
                    layer, group, module, which, index = key.split(".")
                    target = self.tensors[f"{layer}.{group}.{module}.{which}"][slot]
                    i, r = int(index), value.shape[0] if which == "A" else value.shape[1]
                    if which == "A":  # (n_slices * R, d_in): slice i occupies rows i*R : i*R + r
                        target[i * R : i * R + r].copy_(value)
                    else:  # (d_out_total, R): slice i occupies its output rows, first r columns
                        _, slices = self.shape.lora_io(f"{group}.{module}")
                        lo = sum(slices[:i])
                        target[lo : lo + slices[i], :r].copy_(value)
                self.layer_mask[slot] = staged is not None
            else:
                split = staged is not None and "last" in config.intervention_groups
                if split and not self.has_last_set:
                    self.has_last_set = True
                    self._grow(self.capacity)  # same capacity: adds the zero "last.*" tensors
                for tensor in self.tensors.values():
                    tensor[:, slot].zero_()
                names = {"rotate_layer.weight": "rotate", "learned_source.weight": "source_w",
                         "learned_source.bias": "source_b", "proj_layer.weight": "proj"}
                self.layer_mask[slot] = False
                self.split[slot] = split
                for key, value in (staged or {}).items():
                    group, layer, part = key.split(".", 2)
                    prefix = "last." if group == "last" else ""  # 'shared' and 'first' live in the main set
                    self.tensors[prefix + names[part]][int(layer), slot, : value.shape[0]].copy_(value)
                    self.layer_mask[slot, int(layer)] = True
        first_last = config.first_last
        self.first_n[slot] = NO_LIMIT if first_last is None else first_last[0]
        self.last_m[slot] = 0 if first_last is None else first_last[1]
