"""PreftModel: a Hugging Face causal LM with a prefill-only adapter injected.

The adapter acts at prompt tokens only, and never at a token the policy sampled. `forward` takes an explicit
`prompt_mask`, the general per-token adapter mask: True at the tokens the adapter acts on (in one turn, the prompt; in
a multi-turn trajectory, every token the policy did not sample: `adapter_mask_from_spans`). `generate` adapts the
prompt pass (minus any sampled tokens its `prompt_mask` marks) and runs every decode step on the plain base model
through the HF KV cache.
How the selection reaches the adapter modules: `forward` resolves it once into a `TokenSelection` and
passes it down the HF call chain as the `preft_selection` kwarg (Llama-family models forward their
**kwargs to every decoder layer); a pre-hook on each decoder layer pops it and puts it in the shared
`SelectionSlot` that the layer's adapter modules read.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import PreftConfig
from .layers import SelectionSlot
from .masks import TokenSelection, position_ids_from_attention_mask
from .methods import is_adapter_parameter

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_SELECTION_KWARG = "preft_selection"
_instances = itertools.count()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (`model.model.layers`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by preft-rl; supported families: "
            f"{list(SUPPORTED_MODEL_TYPES)} (a Llama-style AutoModelForCausalLM)"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"expected {type(model).__name__}.model.layers to be the decoder layers; pass an AutoModelForCausalLM")
    return layers


class PreftModel(nn.Module):
    """Wraps `base_model` (frozen) and owns the prefill-only adapter modules injected into it.

    `adapter_state` (file-format tensors, see serialization.py) is loaded into the new adapter modules
    before they are attached: the base model is changed only once the config and every tensor fit.
    """

    def __init__(self, base_model: nn.Module, config: PreftConfig, *, adapter_state: dict[str, torch.Tensor] | None = None,
                 adapter_source: str = "the given state dict") -> None:
        super().__init__()
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"the base model must be a loaded Hugging Face causal LM, got {type(base_model).__name__} "
                            f"{base_model!r:.80}; load it first: AutoModelForCausalLM.from_pretrained(...)")
        if not isinstance(config, PreftConfig):
            raise TypeError(f"the adapter config must be a PreftConfig, got {type(config).__name__}"
                            + ("; use PreftConfig(**your_dict)" if isinstance(config, dict) else ""))
        self.preft_config = config
        self._slot = SelectionSlot()
        # Each PreftModel on a base reads its own kwarg, so two adapters can share one frozen base (PPO's policy and
        # critic): a call through one of them leaves the other switched off.
        index = next(_instances)
        self._selection_kwarg = _SELECTION_KWARG if index == 0 else f"{_SELECTION_KWARG}_{index}"
        self._adapter_enabled = True
        generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        layers = decoder_layers(base_model)
        # Build (and load) every adapter module detached from the base model; attach only if all of it succeeded.
        layers_name = next(name for name, module in base_model.named_modules() if module is layers)
        built = config.method_spec.build(base_model, layers, layers_name, config, self._slot, generator)
        if adapter_state is not None:
            from .serialization import load_into_modules

            load_into_modules({f"{layers_name}.{b.name}": b.module for b in built}, adapter_state, adapter_source, config)
        self.base_model = base_model
        # only adapter parameters train (this adapter's, and those of another adapter already on this base)
        base_params = [param for name, param in base_model.named_parameters() if not _is_adapter_name(name)]
        self._detach = [b.attach() for b in built]  # each attach() returns its undo
        for param in base_params:
            param.requires_grad_(False)
        self._adapter_modules = [b.module for b in built]
        self._hooks = [layer.register_forward_pre_hook(self._select_for_layer, with_kwargs=True) for layer in layers]

    # ------------------------------------------------------------------------------ selection
    def _select_for_layer(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        self._slot.current = kwargs.pop(self._selection_kwarg, None)  # absent: a call through another adapter, so off
        return args, kwargs

    def _selection(self, prompt_mask: torch.Tensor) -> TokenSelection | None:
        if not self._adapter_enabled:
            return None
        cfg = self.preft_config
        return TokenSelection.build(prompt_mask, cfg.first_last, cfg.intervention_groups)

    # -------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        share_prompts: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward with the adapter at tokens where `prompt_mask` [B, T] is True.

        Position ids default to positions over non-pad tokens (from `attention_mask`).
        `share_prompts=True` (training on right-padded rows `[prompt | completion | padding]`, e.g. a GRPO group's
        completions): every distinct prompt is computed once (see shared_prompt.py). Logits are then given only at
        each row's last prompt token and its completion tokens (within `logits_to_keep`), and are 0 elsewhere.
        """
        if share_prompts and input_ids is not None and attention_mask is not None and attention_mask.dim() == 2:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            from .shared_prompt import shared_prompt_logits

            keep = kwargs.get("logits_to_keep") or input_ids.shape[1]
            logits = shared_prompt_logits(self, input_ids, attention_mask, prompt_mask, keep)
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits)
        return self._run(self.base_model, input_ids, attention_mask, prompt_mask, position_ids, kwargs)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states [B, T, hidden] (after the final norm) of the decoder alone, with the adapter as in
        `forward`; no LM head, so no [B, T, vocab] logits (a value head reads these)."""
        return self._run(self.base_model.model, input_ids, attention_mask, prompt_mask, position_ids, {}).last_hidden_state

    def _run(self, target: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
             prompt_mask: torch.Tensor | None, position_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        if self._detach is None:
            raise RuntimeError("this PreftModel was unloaded; wrap the base model in a new PreftModel to use an adapter again")
        prompt_mask, position_ids = resolve_call(self.preft_config, input_ids, attention_mask, prompt_mask, position_ids, kwargs)
        kwargs = {**kwargs, self._selection_kwarg: self._selection(prompt_mask)}
        try:
            return target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        finally:
            self._slot.current = None

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """HF `generate`: the prompt pass uses the adapter, every generated token runs the base model.

        Batches must be left-padded (`tokenizer.padding_side = "left"`). Which tokens are prompt tokens
        is decided by position: absolute position < prompt length and not padding. `prompt_mask` (bool, the shape of
        input_ids; default all True) narrows that for a later turn of a conversation: False at the tokens the policy
        sampled in earlier turns, which stay plain (DESIGN invariant 9).
        """
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError("PreftModel.generate needs input_ids (a token tensor); inputs_embeds is not supported")
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "PreftModel.generate got a right-padded batch; generation needs left padding: "
                "set tokenizer.padding_side = 'left' before tokenizing"
            )
        prompt_len = input_ids.shape[1]
        prompt_mask = kwargs.pop("prompt_mask", None)  # multi-turn: False at the tokens the policy sampled in earlier turns
        adapted = attention_mask.bool()
        if prompt_mask is not None:
            if tuple(prompt_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)} but input_ids is {tuple(input_ids.shape)}")
            adapted = adapted & prompt_mask.to(adapted.device, torch.bool)

        def select_prompt_tokens(module: nn.Module, call_args: tuple, call_kwargs: dict) -> tuple[tuple, dict]:
            ids = call_kwargs.get("input_ids", call_args[0] if call_args else None)
            rows, num_new = ids.shape[:2]
            cache = call_kwargs.get("past_key_values")
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + num_new, device=ids.device)  # absolute positions of this call
            in_prompt = positions < prompt_len
            # generated tokens: plain for PreFT, adapted for the all-token baseline
            mask = torch.full((rows, num_new), not self.preft_config.prefill_only, dtype=torch.bool, device=ids.device)
            if bool(in_prompt.any()):
                rows_adapted = adapted.repeat_interleave(rows // adapted.shape[0], dim=0)  # num_return_sequences
                mask[:, in_prompt] = rows_adapted[:, positions[in_prompt]]
            call_kwargs = dict(call_kwargs)
            call_kwargs[self._selection_kwarg] = self._selection(mask)
            return call_args, call_kwargs

        hook = self.base_model.register_forward_pre_hook(select_prompt_tokens, with_kwargs=True)
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            hook.remove()
            self._slot.current = None

    # ---------------------------------------------------------------------------- adapter control
    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """Inside this block the model is the plain base model (the KL reference policy)."""
        return adapter_disabled(self)

    def unload(self) -> nn.Module:
        """Remove this adapter from the base model and return the base model, as it was before (PEFT's `unload`).

        There is no `merge_and_unload`: a prefill-only adapter cannot be merged into weights that every token uses.
        The PreftModel is unusable afterwards. Two adapters on one base (PPO's policy and critic) unload in either
        order, each leaving the other working. If anything else replaced a wrapped layer since, nothing is changed.
        """
        if self._detach is None:
            raise RuntimeError("this PreftModel was already unloaded")
        for detach in self._detach:  # check every module first, so a refused unload changes nothing
            detach(check_only=True)
        for hook in self._hooks:
            hook.remove()
        for detach in reversed(self._detach):
            detach()
        self._detach, self._hooks = None, []
        return self.base_model

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name inside the base model, parameter) for every parameter of this adapter (not of another adapter
        sharing the base); names are as if this adapter were alone on the base, so file keys never change."""
        own = {id(param) for module in self._adapter_modules for sub in _own_modules(module) for param in sub.parameters(recurse=False)}
        for name, param in self.base_model.named_parameters():
            if id(param) in own and _is_adapter_name(name):
                yield _logical(name), param

    def adapter_modules_with_parameters(self) -> list[tuple[nn.Module, list[nn.Parameter]]]:
        """Each module this adapter's method built (one per wrapped linear layer or edited decoder layer), with the
        parameters it reads when it is called: its own and its sub-modules' (not a wrapped base layer's, which is
        called as a module). DeepSpeed ZeRO-3 must gather these around that module's forward and backward
        (preft_rl.trainers.runtime.register_zero3_adapter_parameters)."""
        return [(adapter, [param for sub in _own_modules(adapter) for param in sub.parameters(recurse=False)])
                for adapter in self._adapter_modules]

    def adapter_named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(name inside the base model, module) for every module of this adapter, as adapter_named_parameters names them."""
        own = {id(module) for adapter in self._adapter_modules for module in _own_modules(adapter)}
        for name, module in self.base_model.named_modules():
            if id(module) in own:
                yield _logical(name), module

    def is_identity(self) -> bool:
        """True when every module of this adapter leaves its input exactly unchanged (every method starts so): the
        adapted model then computes exactly what the base does. Needs the full parameters (gather ZeRO-3 shards first)."""
        return all(module.is_identity() for module in self._adapter_modules)

    def num_parameters_summary(self) -> str:
        trainable = sum(p.numel() for _, p in self.adapter_named_parameters())
        total = sum(p.numel() for p in self.base_model.parameters())
        return f"adapter params: {trainable:,} || all params: {total:,} || adapter%: {100 * trainable / total:.4f}"

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors in the file format (see serialization.py): what save_pretrained writes
        and what the engine's update_adapter takes."""
        from .serialization import adapter_state_dict

        return adapter_state_dict(self)

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from .serialization import load_adapter_state_dict

        load_adapter_state_dict(self, state)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        from .serialization import save_adapter

        save_adapter(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_dir: str | os.PathLike,
        *,
        is_trainable: bool = False,
        load_peft_lora_as_prefill_only: bool = False,
    ) -> PreftModel:
        """Load an adapter saved by `save_pretrained` onto `model`.

        A plain PEFT LoRA directory is refused unless `load_peft_lora_as_prefill_only=True`.
        """
        from .serialization import load_adapter

        return load_adapter(cls, model, adapter_dir, is_trainable, load_peft_lora_as_prefill_only)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Switch a PreftModel's (or TenantPreftModel's) adapters off for the block (`_adapter_enabled`)."""
    previous, model._adapter_enabled = model._adapter_enabled, False
    try:
        yield
    finally:
        model._adapter_enabled = previous


def resolve_call(config: PreftConfig, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 prompt_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a forward's inputs and return (the bool mask [B, T] of the tokens the adapter acts at, position ids): prompt
    tokens that are not padding (every non-pad token for the all-token baseline); positions over non-pad tokens."""
    if prompt_mask is None:
        raise ValueError(
            "PreftModel.forward needs prompt_mask: a bool tensor [batch, seq] that is True at prompt "
            "tokens (build it with preft_rl.prompt_mask_from_lengths(attention_mask, prompt_lengths)); "
            "use `with model.disable_adapter():` for the base model"
        )
    tokens = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        raise ValueError("PreftModel.forward needs input_ids or inputs_embeds")
    batch, seq = tokens.shape[:2]
    if tuple(prompt_mask.shape) != (batch, seq):
        raise ValueError(f"prompt_mask has shape {tuple(prompt_mask.shape)} but the input is {(batch, seq)}")
    prompt_mask = prompt_mask.to(device=tokens.device, dtype=torch.bool)
    if not config.prefill_only:  # the all-token baseline acts at every (non-pad) token
        prompt_mask = torch.ones_like(prompt_mask)
    if attention_mask is not None:
        real = attention_mask.bool()[:, -seq:] if attention_mask.dim() == 2 else None
        if real is not None:
            prompt_mask = prompt_mask & real
        if position_ids is None and attention_mask.dim() == 2:
            position_ids = position_ids_from_attention_mask(attention_mask, seq)
    return prompt_mask, position_ids


def get_preft_model(model: nn.Module, config: PreftConfig) -> PreftModel:
    """Freeze `model` and inject a freshly initialised prefill-only adapter (an exact no-op at start)."""
    if isinstance(model, PreftModel):
        raise ValueError("get_preft_model got a PreftModel; pass the plain Hugging Face model")
    return PreftModel(model, config)


def _own_modules(adapter: nn.Module) -> list[nn.Module]:
    """An adapter module and its submodules, without a wrapped base layer (which may hold another adapter)."""
    own = getattr(adapter, "own_modules", None)
    return own() if own is not None else list(adapter.modules())


def _logical(name: str) -> str:
    """A module or parameter name without the '.base_layer' segments that adapter wrappers inserted: the name it
    would have with this adapter alone on the plain base ('self_attn.q_proj.base_layer.lora_A' -> 'self_attn.q_proj.lora_A')."""
    return name.replace(".base_layer", "")


def _is_adapter_name(name: str) -> bool:
    return is_adapter_parameter(name)
