"""Prefill-only LoReFT and DiReFT: low-rank interventions on the residual stream after chosen decoder layers.

    LoReFT  h + R^T (W h + b - R h)    R (r, d) orthonormal rows, W (r, d), b (r,)
    DiReFT  h + W2^T (W1 h + b)        W1 (r, d), b (r,), W2 (r, d)

at the prompt tokens the config's `positions` select ('all', or the first N and last M prompt tokens; one shared
intervention or separate 'first' and 'last' ones). HF side: a ReftLayer on each chosen decoder layer as `preft_reft`;
engine side: per-layer stacked tensors (layers, slots, R, d), replicated on every tensor-parallel rank (the residual
stream is whole on each), with a second 'last.' set once an adapter with separate first/last interventions arrives.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from preft_rl.kernels import apply_direft, apply_loreft

from .. import keys
from ..layers import DiReftIntervention, LoReftIntervention, ReftLayer, TenantReftLayer, orthonormal_rows
from .base import AdapterMethod, BuiltModule, attach_after_layer

_PREFIX = "preft_reft.interventions"


class _ReftMethod(AdapterMethod):
    fields = frozenset({"dropout", "layers", "positions", "share_first_last"})
    site = "residual"
    param_markers = (".preft_reft.",)
    engine_slot_dim = 1
    # {file-key part: engine tensor name}; the engine tensors are (layers, slots, R, d), or (layers, slots, R) for b
    parts: dict[str, str] = {}

    def _intervention(self, d: int, config, device: torch.device, generator) -> torch.nn.Module:
        raise NotImplementedError

    # -------------------------------------------------------------------------------- HF model
    def build(self, base_model, layers, layers_name, config, slot, generator) -> list[BuiltModule]:
        indices = range(len(layers)) if config.layers == "all" else config.layers
        bad = [i for i in indices if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(
                f"layers {bad} out of range: the model has {len(layers)} decoder layers; "
                f"use indices in [0, {len(layers) - 1}] or layers='all'"
            )
        taken = [i for i in indices if hasattr(layers[i], "preft_reft")]
        if taken:
            raise ValueError(
                f"decoder layers {taken} already carry a ReFT intervention of another adapter on this base; two ReFT "
                "adapters cannot share a layer (give the second adapter other layers, or make it a LoRA)"
            )
        hidden = base_model.config.hidden_size
        device = next(base_model.parameters()).device
        built = []
        for i in indices:
            interventions = {group: self._intervention(hidden, config, device, generator) for group in config.intervention_groups}
            reft = ReftLayer(interventions, slot)
            built.append(BuiltModule(f"{i}.preft_reft", reft, functools.partial(attach_after_layer, layers[i], "preft_reft", reft),
                                     functools.partial(attach_after_layer, layers[i], "preft_reft")))
        return built

    def build_tenant_site(self, tenants, slot) -> torch.nn.Module:
        return TenantReftLayer(tenants, slot)

    # ---------------------------------------------------------------------------------- engine
    def engine_tensor_shapes(self, shape, max_rank, capacity, extended) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for prefix in ("", "last.") if extended else ("",):
            for name in self.parts.values():
                tail = (max_rank,) if name == "source_b" else (max_rank, shape.hidden)
                shapes[prefix + name] = (shape.num_layers, capacity, *tail)
        return shapes

    def engine_extended(self, config) -> bool:
        return "last" in config.intervention_groups  # separate 'last' interventions live in the 'last.' set

    def engine_expected_keys(self, config, shape) -> frozenset[str]:
        layers = range(shape.num_layers) if config.layers == "all" else config.layers
        return frozenset(
            keys.layer_key(i, f"{_PREFIX}.{group}.{part}") for i in layers for group in config.intervention_groups for part in self.parts
        )

    def engine_stage(self, name, state, config, shape, check):
        r = config.r
        groups = config.intervention_groups  # ("shared",) or ("first", "last")
        staged: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            where = keys.split_layer_key(key)
            group, _, part = where[1][len(_PREFIX) + 1:].partition(".") if where and where[1].startswith(_PREFIX + ".") else ("", "", "")
            if not where or where[0] >= shape.num_layers or group not in groups:
                raise ValueError(
                    f"adapter {name!r}: unexpected tensor {key!r} for a {self.name} adapter with interventions "
                    f"{list(groups)} on this {shape.num_layers}-layer model"
                )
            if part in self._free_parameters():
                continue  # a free parameter the engine does not use (LoReFT's raw R; the materialised R is used)
            if part not in self.parts:
                raise ValueError(f"adapter {name!r}: tensor {key!r} does not belong to a {self.name} adapter")
            want = (r,) if self.parts[part] == "source_b" else (r, shape.hidden)
            staged[f"{group}.{where[0]}.{part}"] = check(key, tensor, want)
        if not staged:
            raise ValueError(f"adapter {name!r}: no {self.name} tensors found")
        used = frozenset(k for k in state if not any(k.endswith("." + p) for p in self._free_parameters()))
        return staged, used

    def _free_parameters(self) -> tuple[str, ...]:
        return tuple(source for source, _ in self.derived_tensors().values())

    def engine_write(self, tensors, slot, staged, config, shape, max_rank) -> np.ndarray:
        layer_mask = np.zeros(shape.num_layers, dtype=bool)
        for key, value in staged.items():
            group, layer, part = key.split(".", 2)
            prefix = "last." if group == "last" else ""  # 'shared' and 'first' live in the main set
            tensors[prefix + self.parts[part]][int(layer), slot, : value.shape[0]].copy_(value)
            layer_mask[int(layer)] = True
        return layer_mask

    # ------------------------------------------------------------------------------------ plan
    def plan_adapter_params(self, shape, rank) -> int:
        return shape.layers * (2 * rank * shape.hidden + rank)

    def plan_slot_elems(self, shape, rank, tp) -> float:
        return shape.layers * (2 * rank * shape.hidden + rank)  # replicated on every rank


class LoReftMethod(_ReftMethod):
    name = "loreft"
    parts = {"rotate_layer.weight": "rotate", "learned_source.weight": "source_w", "learned_source.bias": "source_b"}

    def _intervention(self, d, config, device, generator):
        return LoReftIntervention(d, config.r, config.dropout, device, generator)

    def derived_tensors(self):
        return {"rotate_layer.weight": ("rotate_layer.raw", orthonormal_rows)}

    def engine_apply_residual(self, residual, tensors, layer, passes) -> None:
        for prefix, metadata in passes:  # in order: a token in both ranges gets 'first', then 'last'
            apply_loreft(residual, tensors[prefix + "rotate"][layer], tensors[prefix + "source_w"][layer],
                         tensors[prefix + "source_b"][layer], metadata)


class DiReftMethod(_ReftMethod):
    name = "direft"
    fields = _ReftMethod.fields | {"init_scale"}
    parts = {"learned_source.weight": "source_w", "learned_source.bias": "source_b", "proj_layer.weight": "proj"}

    def _intervention(self, d, config, device, generator):
        return DiReftIntervention(d, config.r, config.dropout, device, config.init_scale, generator)

    def engine_apply_residual(self, residual, tensors, layer, passes) -> None:
        for prefix, metadata in passes:
            apply_direft(residual, tensors[prefix + "source_w"][layer], tensors[prefix + "source_b"][layer],
                         tensors[prefix + "proj"][layer], metadata)
