"""Prefill-only LoRA: `y = W x + b + (alpha / r) B A x` at prompt tokens, `y = W x + b` elsewhere.

HF side: every targeted nn.Linear inside the decoder layers is wrapped in a PreftLoraLinear (PEFT's parameter names,
`lora_A.weight` (r, d_in), `lora_B.weight` (d_out, r), so the file keys are PEFT's). Engine side: one stacked A and B
per fused vLLM module (see preft_rl/kernels/lora.py for the layout), sharded over tensor-parallel ranks as vLLM shards
its own multi-LoRA.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from preft_rl.kernels import apply_lora

from .. import keys
from ..layers import PreftLoraLinear, TenantLoraLinear
from .base import AdapterMethod, BuiltModule

_LORA_PARAM = re.compile(r"^((?:\w+\.)*\w+)\.lora_([AB])\.weight$")  # '<module path in the layer>.lora_A.weight'


class LoraMethod(AdapterMethod):
    name = "lora"
    fields = frozenset({"alpha", "dropout", "target_modules", "init_scale"})
    site = "linear"
    param_markers = (".lora_A.", ".lora_B.")
    engine_slot_dim = 0

    def validate(self, config) -> None:
        if config.alpha is None:
            config.alpha = float(2 * config.r)

    # -------------------------------------------------------------------------------- HF model
    def build(self, base_model, layers, layers_name, config, slot, generator) -> list[BuiltModule]:
        wanted = config.target_modules
        found: set[str] = set()
        # Names are matched as full paths in the base model ('model.layers.0.self_attn.q_proj'), as PEFT does. A linear
        # layer already wrapped by another adapter on this base is found as `<name>.base_layer` and matched by <name>;
        # that adapter's own lora_A / lora_B are never targets.
        targets = []
        for i, layer in enumerate(layers):
            for name, module in layer.named_modules():
                if not isinstance(module, nn.Linear) or re.search(r"(^|\.)lora_[AB]$", name):
                    continue
                logical = name.replace(".base_layer", "")
                if wanted != "all-linear":
                    hits = keys.matching_targets(f"{layers_name}.{i}.{logical}", wanted)
                    found.update(hits)
                    if not hits:
                        continue
                targets.append((i, layer, name, logical, module))
        if wanted != "all-linear" and (missing := [m for m in wanted if m not in found]):
            available = sorted({n.rpartition(".")[2] for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"target_modules {missing} match no linear layer inside the decoder layers; "
                f"available: {available} (or target_modules='all-linear')"
            )
        built = []
        for i, layer, name, logical, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            lora = PreftLoraLinear(module, config.r, config.alpha, config.dropout, slot, config.init_scale, generator)
            built.append(BuiltModule(f"{i}.{logical}", lora, functools.partial(_attach, parent, child, lora),
                                     functools.partial(_attach, parent, child)))
        return built

    def build_tenant_site(self, tenants, slot) -> nn.Module:
        return TenantLoraLinear(next(iter(tenants.values())).base_layer, tenants, slot)

    # ---------------------------------------------------------------------------------- engine
    def engine_tensor_shapes(self, shape, max_rank, capacity, extended) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for layer in range(shape.num_layers):
            for module in shape.fused_linear:
                d_in, slices = shape.lora_io(module)
                shapes[f"{layer}.{module}.A"] = (capacity, len(slices) * max_rank, d_in)
                shapes[f"{layer}.{module}.B"] = (capacity, sum(slices), max_rank)
        shapes["scaling"] = (capacity,)
        return shapes

    def engine_check_config(self, name, config, dtype) -> None:
        if not torch.isfinite(torch.tensor(config.scaling, dtype=dtype)):
            raise ValueError(
                f"adapter {name!r}: LoRA scaling alpha / r = {config.scaling} is not finite in {dtype} "
                f"(alpha={config.alpha}, r={config.r}); use a finite alpha such as alpha={2 * config.r}"
            )

    def engine_expected_keys(self, config, shape) -> frozenset[str] | None:
        # Every (layer, module) by its full name in the HF model, matched as PreftModel matches target_modules: short
        # names ('q_proj', 'self_attn.q_proj') and PEFT's full paths ('model.layers.0.mlp.down_proj') alike.
        full = {(i, m): keys.module_path(i, m) for i in range(shape.num_layers) for hfs in shape.fused_linear.values() for m in hfs}
        if config.target_modules != "all-linear":
            if not all(any(keys.names_target(path, t) for path in full.values()) for t in config.target_modules):
                return None  # a name this engine does not know: the tensors alone define the adapter
            full = {k: path for k, path in full.items() if keys.matching_targets(path, config.target_modules)}
        return frozenset(keys.layer_key(i, f"{m}.lora_{ab}.weight") for (i, m) in full for ab in "AB")

    def engine_stage(self, name, state, config, shape, check):
        r = config.r
        hf_to_fused = {hf: (fused, i) for fused, hfs in shape.fused_linear.items() for i, hf in enumerate(hfs)}
        staged: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            where = keys.split_layer_key(key)
            match = _LORA_PARAM.match(where[1]) if where else None
            if not match or where[0] >= shape.num_layers or match.group(1) not in hf_to_fused:
                raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} for a LoRA adapter on this {shape.num_layers}-layer model")
            layer, which = where[0], match.group(2)
            fused, index = hf_to_fused[match.group(1)]
            d_in, slices = shape.lora_io_full(fused)
            checked = check(key, tensor, (r, d_in) if which == "A" else (slices[index], r))
            staged[f"{layer}.{fused}.{which}.{index}"] = shard_lora_tensor(shape, fused, which, index, checked)
        if not staged:
            raise ValueError(f"adapter {name!r}: no LoRA tensors found (keys like {keys.layer_key(0, 'self_attn.q_proj.lora_A.weight')})")
        if config.target_modules == "all-linear" or self.engine_expected_keys(config, shape) is not None:
            return staged, frozenset(state)
        # LoRA on modules the config cannot name here: at least every A needs its B
        wanted = frozenset(k[: -len("A.weight")] + ab + ".weight" for k in state for ab in "AB")
        if missing := sorted(wanted - set(state)):
            raise ValueError(f"adapter {name!r}: missing {len(missing)} tensors, e.g. {missing[:3]}; every lora_A needs its lora_B")
        return staged, frozenset(state)

    def engine_write(self, tensors, slot, staged, config, shape, max_rank) -> np.ndarray:
        tensors["scaling"][slot] = config.scaling
        for key, value in staged.items():
            layer, fused, which, index = _split_staged(key)
            target = tensors[f"{layer}.{fused}.{which}"][slot]
            i = int(index)
            if which == "A":  # (n_slices * R, d_in): slice i occupies rows i*R : i*R + r
                target[i * max_rank : i * max_rank + value.shape[0]].copy_(value)
            else:  # (d_out_total, R): slice i occupies its output rows, first r columns
                _, slices = shape.lora_io(fused)
                lo = sum(slices[:i])
                target[lo : lo + slices[i], : value.shape[1]].copy_(value)
        return np.ones(shape.num_layers, dtype=bool)

    def engine_linear_modules(self, shape) -> tuple[str, ...]:
        return tuple(shape.fused_linear)

    def engine_apply_linear(self, x, out, tensors, layer, module, metadata, shape, all_reduce) -> None:
        _, slices = shape.lora_io(module)
        args = (
            x,  # (T, d_in): this rank's input (a shard of it for row-parallel layers)
            tensors[f"{layer}.{module}.A"],  # (S, n_slices * R, d_in)
            tensors[f"{layer}.{module}.B"],  # (S, d_out_total, R)
            tensors["scaling"],  # (S,)
            metadata,
        )
        if shape.tp_size > 1 and module in shape.row_parallel:
            # The hook runs after vLLM's all-reduce of this layer's output, and this rank's input columns give a partial
            # delta: sum the partial deltas over the ranks, then add the whole delta on every rank. Every rank has the
            # same selection (the same batch), so all of them reach this all-reduce.
            partial = torch.zeros_like(out)
            apply_lora(partial, *args, output_slices=slices)
            out.add_(all_reduce(partial))
            return
        apply_lora(out, *args, output_slices=slices)  # (T, d_out_total), edited in place at adapted rows

    # ------------------------------------------------------------------------------------ plan
    def plan_adapter_params(self, shape, rank) -> int:
        return shape.layers * sum(rank * (d_in + d_out) for d_in, d_out in shape.linear_io())

    def plan_slot_elems(self, shape, rank, tp) -> float:
        # sharded like vLLM's own multi-LoRA: A whole and B by rows for column-parallel layers, A by columns for
        # row-parallel ones; KV heads replicate once tp exceeds them
        h, q, i = shape.hidden, shape.q_size, shape.intermediate
        kv_rank = max(1, shape.kv_heads // tp) * shape.head_dim
        qkv = 3 * rank * h + (q / tp + 2 * kv_rank) * rank
        o = rank * q / tp + h * rank
        gate_up = 2 * rank * h + 2 * i / tp * rank
        down = rank * i / tp + h * rank
        return shape.layers * (qkv + o + gate_up + down)


def _split_staged(key: str) -> tuple[str, str, str, str]:
    """'3.self_attn.qkv_proj.A.0' -> ('3', 'self_attn.qkv_proj', 'A', '0')."""
    layer, rest = key.split(".", 1)
    fused, which, index = rest.rsplit(".", 2)
    return layer, fused, which, index


def shard_lora_tensor(shape: Any, fused: str, which: str, index: int, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole LoRA tensor: A (r, d_in) or B (d_out of slice `index`, r). Column-parallel modules
    keep this rank's output rows of B (k/v by KV head); row-parallel ones keep this rank's input columns of A."""
    if shape.tp_size == 1:
        return tensor
    d_in, slices = shape.lora_io(fused)
    row_parallel = fused in shape.row_parallel
    if which == "A":
        return tensor[:, shape.tp_rank * d_in : (shape.tp_rank + 1) * d_in] if row_parallel else tensor
    if row_parallel:
        return tensor  # row-parallel layers produce the whole output (after the all-reduce)
    start, rows = shape.output_shard(fused, index)
    return tensor[start : start + rows]


def _attach(parent: nn.Module, child: str, lora: nn.Module):
    setattr(parent, child, lora)

    def detach(check_only: bool = False) -> None:
        if getattr(parent, child) is not lora:
            raise RuntimeError(f"cannot unload: another adapter wraps {child!r} on top of this one; unload that adapter first")
        if not check_only:
            setattr(parent, child, lora.base_layer)

    return detach
