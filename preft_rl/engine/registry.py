"""The engine's adapter registry: named adapters in stacked, slot-indexed tensors.

Every adapter occupies one slot; all adapters of an engine share one method and are zero-padded to
`max_rank` (zero rows/columns add exactly 0.0, so padding never changes a result). Capacity grows on
demand by doubling, up to `max_adapters`. A ReFT adapter with separate first/last interventions
(share_first_last=False) keeps its 'first' intervention in the main tensors and its 'last' one in a
second set ("last.<name>"), allocated when the first such adapter arrives. Adapters arrive in the file format that
`PreftModel.save_pretrained` writes (see preft_rl/adapters/serialization.py) and are validated fully
before any slot is touched, so a refused adapter leaves the engine as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ModelShape:
    """What the registry needs to know about the base model (from its HF config)."""

    num_layers: int
    hidden: int
    q_size: int
    kv_size: int
    intermediate: int

    @staticmethod
    def from_hf_config(config) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return ModelShape(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            q_size=config.num_attention_heads * head_dim,
            kv_size=config.num_key_value_heads * head_dim,
            intermediate=config.intermediate_size,
        )

    def lora_io(self, vllm_module: str) -> tuple[int, tuple[int, ...]]:
        """(d_in, output slice sizes) of a fused vLLM module."""
        return {
            "self_attn.qkv_proj": (self.hidden, (self.q_size, self.kv_size, self.kv_size)),
            "self_attn.o_proj": (self.q_size, (self.hidden,)),
            "mlp.gate_up_proj": (self.hidden, (self.intermediate, self.intermediate)),
            "mlp.down_proj": (self.intermediate, (self.hidden,)),
        }[vllm_module]


@dataclass
class AdapterEntry:
    name: str
    slot: int
    version: int
    rank: int
    config: PreftConfig


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
        staged = self._stage(name, state, config)  # validates everything before touching a slot
        used = {e.slot for e in self.entries.values()}
        slot = next(i for i in range(self.max_adapters) if i not in used)
        if slot >= self.capacity:
            self._grow(2 * self.capacity)
        entry = AdapterEntry(name=name, slot=slot, version=1, rank=staged.pop("__rank__"), config=config)
        self._write(slot, staged, config)
        self.entries[name] = entry
        return entry

    def update(self, name: str, state: dict[str, torch.Tensor]) -> AdapterEntry:
        entry = self.get(name)
        staged = self._stage(name, state, entry.config)
        staged.pop("__rank__")
        self._write(entry.slot, staged, entry.config)
        entry.version += 1
        return entry

    def remove(self, name: str) -> None:
        entry = self.get(name)
        self._write(entry.slot, None, entry.config)
        del self.entries[name]

    def get(self, name: str) -> AdapterEntry:
        if name not in self.entries:
            known = sorted(self.entries)
            raise KeyError(f"unknown adapter {name!r}; registered: {known[:10]}{' ...' if len(known) > 10 else ''} (add_adapter first)")
        return self.entries[name]

    # ----------------------------------------------------------------------- validation
    def _stage(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> dict:
        if config.method != self.method:
            raise ValueError(f"adapter {name!r} is {config.method!r} but this engine serves {self.method!r} adapters")
        if config.r > self.max_rank:
            raise ValueError(
                f"adapter {name!r} has rank {config.r} but the engine was started with max_rank={self.max_rank}; "
                f"start it with max_rank>={config.r}"
            )
        stage = self._stage_lora if config.is_lora else self._stage_reft
        staged = stage(name, state, config)
        staged["__rank__"] = config.r
        return staged

    def _check(self, name: str, key: str, tensor: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
        if tuple(tensor.shape) != want:
            raise ValueError(f"adapter {name!r}: tensor {key} has shape {tuple(tensor.shape)}, expected {want} for this base model")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"adapter {name!r}: tensor {key} has non-finite values")
        return tensor

    def _stage_lora(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> dict:
        r, s = config.r, self.shape
        hf_to_vllm = {hf: (vm, i) for vm, hfs in LORA_TARGETS.items() for i, hf in enumerate(hfs)}
        staged: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            match = _LORA_KEY.match(key)
            if not match or int(match.group(1)) >= s.num_layers or match.group(2) not in hf_to_vllm:
                raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} for a LoRA adapter on this {s.num_layers}-layer model")
            layer, hf_module, which = int(match.group(1)), match.group(2), match.group(3)
            vllm_module, index = hf_to_vllm[hf_module]
            d_in, slices = s.lora_io(vllm_module)
            want = (r, d_in) if which == "A" else (slices[index], r)
            staged[f"{layer}.{vllm_module}.{which}.{index}"] = self._check(name, key, tensor, want)
        if not staged:
            raise ValueError(f"adapter {name!r}: no LoRA tensors found (keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)")
        halves = {k[:-4] + k[-2:] for k in staged}  # "layer.module.index"
        for half in halves:
            layer_module, index = half.rsplit(".", 1)
            for which in "AB":
                if f"{layer_module}.{which}.{index}" not in staged:
                    raise ValueError(f"adapter {name!r}: {layer_module} slice {index} has lora_{'B' if which == 'B' else 'A'} missing")
        return staged

    def _stage_reft(self, name: str, state: dict[str, torch.Tensor], config: PreftConfig) -> dict:
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
        layers = sorted({int(k.split(".")[1]) for k in staged})
        if not layers:
            raise ValueError(f"adapter {name!r}: no {self.method} tensors found")
        for layer in layers:
            for group in groups:
                for part in wanted:
                    if f"{group}.{layer}.{part}" not in staged:
                        raise ValueError(f"adapter {name!r}: layer {layer} lacks {group} {part}")
        return staged

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
