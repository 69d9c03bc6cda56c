"""TenantPreftModel: many tenants' prefill-only adapters of one method on one frozen base, in one forward.

Each row of a forward names its tenant (or None for the plain base); each tenant's adapter acts only at its own rows'
prompt tokens. At every adapter site (a wrapped linear layer, an edited decoder layer) one site module, built by the
method (`AdapterMethod.build_tenant_site`), applies every tenant's edit in one multi-adapter op (preft_rl.kernels
`prefill_*_multi`: grouped torch on CPU, Triton on CUDA).

Each tenant's adapter is exactly the adapter a PreftModel with the same config would have: built by the same method
`build` with the same seed (so it starts from the same weights), its parameters under the same file keys, and saved
and loaded in the same files (`tenant(name)` is a view the serialization functions take as a PreftModel). Rows of a
tenant compute what that tenant's PreftModel computes on them, whatever other tenants share the batch; a tenant with no
rows in a forward is not in its autograd graph (its gradient stays None).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import PreftConfig
from .layers import SelectionSlot
from .masks import TenantSelection
from .model import _is_adapter_name, _own_modules, adapter_disabled, decoder_layers, resolve_call

_SELECTION_KWARG = "preft_tenant_selection"
_TENANT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_tenant_names(names: Sequence[str]) -> list[str]:
    """Tenant names as a list, after checking them: 1-64 characters of letters, digits, '_' and '-' (each names a
    module, an output folder and a served adapter), and no repeats."""
    names = list(names)
    if not names:
        raise ValueError("tenants is empty; give at least one tenant name")
    for name in names:
        if not isinstance(name, str) or not _TENANT_NAME.match(name):
            raise ValueError(f"tenant name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-' (it names the "
                             "tenant's adapter folder and its adapter in `preft-rl serve`)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"tenant names {repeated} appear more than once; every tenant needs its own name")
    return names


class TenantAdapter:
    """One tenant's adapter inside a TenantPreftModel, as the serialization functions see a PreftModel: its parameters
    under their file names (`adapter_named_parameters`), its config and the base model."""

    def __init__(self, owner: TenantPreftModel, name: str) -> None:
        self._owner, self.name = owner, name
        self.preft_config = owner.preft_config
        self.base_model = owner.base_model

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for prefix, module in self._owner._tenant_modules[self.name].items():
            for name, param in module.named_parameters():
                if _is_adapter_name(f"{prefix}.{name}"):
                    yield f"{prefix}.{name}", param

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from .serialization import adapter_state_dict

        return adapter_state_dict(self)

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "the given state dict") -> None:
        from .serialization import load_adapter_state_dict

        load_adapter_state_dict(self, state, source)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from .serialization import save_adapter

        save_adapter(self, save_directory)

    def is_identity(self) -> bool:
        return all(module.is_identity() for module in self._owner._tenant_modules[self.name].values())


class TenantPreftModel(nn.Module):
    """Wraps `base_model` (frozen) with one adapter per tenant, all of `config`'s method, rank and sites."""

    def __init__(self, base_model: nn.Module, config: PreftConfig, tenants: Sequence[str]) -> None:
        super().__init__()
        if not isinstance(config, PreftConfig):
            raise TypeError(f"the adapter config must be a PreftConfig, got {type(config).__name__}")
        if config.dropout:
            raise ValueError(f"dropout={config.dropout}: the many-tenant forward has no dropout; use dropout=0.0")
        self.tenant_names = tuple(check_tenant_names(tenants))
        self.preft_config = config
        self._slot = SelectionSlot()
        self._adapter_enabled = True
        spec = config.method_spec
        layers = decoder_layers(base_model)
        layers_name = next(name for name, module in base_model.named_modules() if module is layers)
        off = SelectionSlot()  # the per-tenant modules never run themselves: their site module applies them
        per_tenant = {}
        for name in self.tenant_names:  # each tenant starts as a PreftModel with this config would (same seed)
            generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
            per_tenant[name] = spec.build(base_model, layers, layers_name, config, off, generator)
        first = per_tenant[self.tenant_names[0]]
        if any(b.place is None for b in first):
            raise ValueError(f"adapter method {config.method!r} builds modules without `place`: it cannot train many tenants")
        sites = [spec.build_tenant_site({name: per_tenant[name][j].module for name in self.tenant_names}, self._slot)
                 for j in range(len(first))]
        self.base_model = base_model
        base_params = [param for name, param in base_model.named_parameters() if not _is_adapter_name(name)]
        self._detach = [built.place(site) for built, site in zip(first, sites)]
        for param in base_params:
            param.requires_grad_(False)
        self._sites = sites
        self._tenant_modules = {name: {f"{layers_name}.{b.name}": b.module for b in built} for name, built in per_tenant.items()}
        self._hooks = [layer.register_forward_pre_hook(self._select_for_layer, with_kwargs=True) for layer in layers]

    # ------------------------------------------------------------------------------ selection
    def _select_for_layer(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        self._slot.current = kwargs.pop(_SELECTION_KWARG, None)
        return args, kwargs

    def _selection(self, prompt_mask: torch.Tensor, tenants: Sequence[str | None]) -> TenantSelection | None:
        if len(tenants) != prompt_mask.shape[0]:
            raise ValueError(f"tenants has {len(tenants)} entries but the batch has {prompt_mask.shape[0]} rows; give one "
                             "tenant name (or None for the base model) per row")
        unknown = sorted({t for t in tenants if t is not None and t not in self.tenant_names})
        if unknown:
            raise ValueError(f"unknown tenants {unknown}; this model has {list(self.tenant_names)}")
        if not self._adapter_enabled:
            return None
        present = set(tenants)
        active = tuple(name for name in self.tenant_names if name in present)
        slot_of = {name: i for i, name in enumerate(active)}
        row_slots = torch.tensor([slot_of.get(t, -1) if t is not None else -1 for t in tenants], dtype=torch.long,
                                 device=prompt_mask.device)
        cfg = self.preft_config
        return TenantSelection.build(prompt_mask, row_slots, active, cfg.first_last, cfg.intervention_groups)

    # -------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                prompt_mask: torch.Tensor | None = None, tenants: Sequence[str | None] | None = None,
                position_ids: torch.Tensor | None = None, share_prompts: bool = False, **kwargs: Any) -> Any:
        """The base model's forward where row b's prompt tokens get tenant `tenants[b]`'s adapter (None: no adapter).
        `share_prompts=True`: every distinct (tenant, prompt) is computed once, as PreftModel.forward does."""
        if tenants is None:
            raise ValueError("TenantPreftModel.forward needs tenants: one tenant name (or None) per row")
        if share_prompts and input_ids is not None and attention_mask is not None and attention_mask.dim() == 2:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            from .shared_prompt import shared_prompt_logits

            keep = kwargs.get("logits_to_keep") or input_ids.shape[1]
            logits = shared_prompt_logits(self, input_ids, attention_mask, prompt_mask, keep, list(tenants))
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits)
        return self._run(self.base_model, input_ids, attention_mask, prompt_mask, tenants, position_ids, kwargs)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      prompt_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      tenants: Sequence[str | None] | None = None) -> torch.Tensor:
        """Last hidden states [B, T, hidden] of the decoder alone (no LM head), with the tenants' adapters as in forward."""
        if tenants is None:
            raise ValueError("TenantPreftModel.hidden_states needs tenants: one tenant name (or None) per row")
        return self._run(self.base_model.model, input_ids, attention_mask, prompt_mask, tenants, position_ids, {}).last_hidden_state

    def _run(self, target: nn.Module, input_ids, attention_mask, prompt_mask, tenants, position_ids, kwargs) -> Any:
        prompt_mask, position_ids = resolve_call(self.preft_config, input_ids, attention_mask, prompt_mask, position_ids, kwargs)
        kwargs = {**kwargs, _SELECTION_KWARG: self._selection(prompt_mask, list(tenants))}
        try:
            return target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        finally:
            self._slot.current = None

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Inside this block every row runs the plain base model (the KL reference policy)."""
        return adapter_disabled(self)

    # ---------------------------------------------------------------------------- tenants' adapters
    def tenant(self, name: str) -> TenantAdapter:
        """Tenant `name`'s adapter: adapter_named_parameters / adapter_state_dict / load_adapter_state_dict /
        save_pretrained / is_identity, as on a PreftModel."""
        if name not in self.tenant_names:
            raise ValueError(f"unknown tenant {name!r}; this model has {list(self.tenant_names)}")
        return TenantAdapter(self, name)

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """('<tenant>/<file name>', parameter) for every tenant's adapter parameters, tenant by tenant."""
        for name in self.tenant_names:
            for key, param in self.tenant(name).adapter_named_parameters():
                yield f"{name}/{key}", param

    def adapter_modules_with_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """Each site module with every parameter it reads (all tenants' at that site), for DeepSpeed ZeRO-3."""
        return [(site, [param for sub in _own_modules(site) for param in sub.parameters(recurse=False)
                        if param.requires_grad]) for site in self._sites]
