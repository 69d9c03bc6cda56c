"""Triton kernels for multi-adapter prefill-only LoRA / ReFT with pure-torch references.

Installed as `preft_rl.kernels` (see pyproject.toml). Kernels know nothing of models or engines: they see a
per-token adapter slot (`token_adapter_index`, -1 = no adapter) grouped once per step into
`AdapterTokenMetadata`, and stacked per-slot weights.

    meta = AdapterTokenMetadata.build(token_adapter_index)        # once per step, reused by every layer
    apply_lora(out, x, lora_a, lora_b, scaling, meta)              # serving: in place, rows with -1 untouched
    apply_loreft(h, rotation, weight, bias, meta); apply_direft(h, weight, bias, proj, meta)
    prefill_lora(base_out, x, A, B, scaling, prompt_mask)          # training: differentiable, one adapter
    prefill_loreft(h, R, W, b, prompt_mask); prefill_direft(h, W1, b, W2, prompt_mask)
    prefill_lora_multi(base_out, x, A, B, scaling, index)          # training many adapters: differentiable, per row
    prefill_loreft_multi(h, R, W, b, index); prefill_direft_multi(h, W1, b, W2, index)

Backend: Triton for CUDA tensors, torch otherwise; `backend="torch"|"triton"` or PREFT_KERNEL_BACKEND
overrides (Triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported). Triton itself is
imported only when a Triton op runs.
"""

from .autograd import (
    PrefillLoraFunction,
    PrefillReftFunction,
    lora_prefill_reference,
    prefill_direft,
    prefill_lora,
    prefill_loreft,
    reft_prefill_reference,
)
from .dispatch import resolve_backend
from .lora import apply_lora, lora_forward_reference
from .metadata import AdapterTokenMetadata
from .multi_prefill import prefill_direft_multi, prefill_lora_multi, prefill_loreft_multi
from .reft import apply_direft, apply_loreft, direft_forward_reference, loreft_forward_reference

__all__ = [
    "AdapterTokenMetadata",
    "apply_lora",
    "apply_loreft",
    "apply_direft",
    "lora_forward_reference",
    "loreft_forward_reference",
    "direft_forward_reference",
    "prefill_lora",
    "prefill_loreft",
    "prefill_direft",
    "prefill_lora_multi",
    "prefill_loreft_multi",
    "prefill_direft_multi",
    "PrefillLoraFunction",
    "PrefillReftFunction",
    "lora_prefill_reference",
    "reft_prefill_reference",
    "resolve_backend",
]
