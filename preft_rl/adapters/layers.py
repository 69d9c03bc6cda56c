"""Prefill-only adapter modules for the Hugging Face reference path.

Each module reads the current `TokenSelection` from a `SelectionSlot` shared by the whole model and
acts only at the selected (prompt) tokens; everywhere else its output is the base output, bit for bit.
Adapter parameters are kept in fp32 and the adapter arithmetic is done in fp32 whatever the model dtype.

On CUDA (and with no dropout) the arithmetic runs in the Triton prefill kernels of preft_rl.kernels, which gather
the prompt rows, accumulate in fp32 and write only those rows, forward and backward; elsewhere it is the plain
torch below. `PREFT_KERNEL_BACKEND=torch` forces torch everywhere (see preft_rl/kernels/dispatch.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from preft_rl.kernels import (
    PrefillLoraFunction,
    PrefillReftFunction,
    lora_prefill_reference,
    prefill_direft_multi,
    prefill_lora_multi,
    prefill_loreft_multi,
    reft_prefill_reference,
    resolve_backend,
)

from .masks import TokenSelection


class SelectionSlot:
    """Holds the TokenSelection of the decoder layer being run (None: adapter off for this call).

    Set by a pre-hook on every decoder layer from that layer's call kwargs, so gradient checkpointing,
    which re-runs a layer with its original kwargs during backward, sees the same selection again.
    """

    def __init__(self) -> None:
        self.current: TokenSelection | None = None


def _uniform_(weight: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    # Drawn on the CPU so that one seeded CPU generator initialises adapters on any device identically.
    with torch.no_grad():
        weight.copy_(torch.empty(weight.shape).uniform_(-bound, bound, generator=generator))


class PreftLoraLinear(nn.Module):
    """`y = W x + b + scaling * B A dropout(x)` at prompt tokens, `y = W x + b` elsewhere.

    Parameter names follow PEFT (`lora_A.weight` [r, d_in], `lora_B.weight` [d_out, r]) and the wrapped
    layer is `base_layer`.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float,
        slot: SelectionSlot,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        _uniform_(self.lora_A.weight, init_scale or 1.0 / math.sqrt(base_layer.in_features), generator)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: an exact no-op that still gets gradients through B
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / r
        self._slot = slot

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, d_out)
        selection = self._slot.current
        if selection is None:
            return out
        a, b = self.lora_A.weight, self.lora_B.weight
        out2, x2 = out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])  # (B * T, d_out), (B * T, d_in)
        if isinstance(self.lora_dropout, nn.Identity) and resolve_backend(None, out, x, a, b) == "triton":
            out2 = PrefillLoraFunction.apply(out2, x2, a, b, float(self.scaling), selection.row_metadata("prompt"))
        else:  # the kernels' torch reference: the one torch copy of this maths
            dropout = None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout
            out2 = lora_prefill_reference(out2, x2, a, b, self.scaling, selection.rows("prompt"), dropout)
        return out2.reshape(out.shape)

    def own_modules(self) -> list[nn.Module]:
        """This adapter's modules, without the wrapped base layer (which may hold another adapter)."""
        return [self, *self.lora_A.modules(), *self.lora_B.modules(), *self.lora_dropout.modules()]

    def is_identity(self) -> bool:
        """True when the edit is exactly zero for every input (B = 0 or A = 0), as at initialisation."""
        return not self.lora_B.weight.any() or not self.lora_A.weight.any()

    def extra_repr(self) -> str:
        return f"r={self.lora_A.out_features}, scaling={self.scaling}"


class OrthonormalRows(nn.Module):
    """R [r, d] with orthonormal rows, as a smooth function of a free parameter `raw` [r, d].

    R = Q^T from the QR decomposition of raw^T, with signs fixed so diag of the triangular factor is
    positive (which makes the map unique and differentiable). Any scaling of `raw` gives the same R, so
    weight decay on `raw` cannot break orthogonality (unlike torch's householder parametrization, whose
    sign diagonal AdamW's decay truncates to zero).
    """

    def __init__(self, d: int, r: int, device: torch.device, generator: torch.Generator | None) -> None:
        super().__init__()
        gaussian = torch.randn(d, r, generator=generator)  # drawn on the CPU, as in _uniform_
        self.raw = nn.Parameter(torch.linalg.qr(gaussian).Q.T.contiguous().to(device))  # (r, d)

    @property
    def weight(self) -> torch.Tensor:
        return orthonormal_rows(self.raw)


def orthonormal_rows(raw: torch.Tensor) -> torch.Tensor:
    """R (r, d) with orthonormal rows from the free parameter raw (r, d): OrthonormalRows.weight."""
    q, tri = torch.linalg.qr(raw.T)  # (d, r), (r, r)
    signs = torch.where(torch.diagonal(tri) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).T  # (r, d)


class LoReftIntervention(nn.Module):
    """LoReFT: `h + R^T (W h + b - R h)` with R [r, d] having orthonormal rows.

    R is `rotate_layer.weight` (an OrthonormalRows); W, b are `learned_source`. Initialised with
    W = R and b = 0 and computed as `(W - R) h + b`, so the start is an exact no-op.
    """

    def __init__(self, d: int, r: int, dropout: float, device: torch.device, generator: torch.Generator | None) -> None:
        super().__init__()
        if r > d:
            raise ValueError(f"LoReFT rank r={r} exceeds the hidden size {d}; use r <= {d}")
        self.rotate_layer = OrthonormalRows(d, r, device, generator)
        self.learned_source = nn.Linear(d, r, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.learned_source.weight.copy_(self.rotate_layer.weight)
            self.learned_source.bias.zero_()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(first, bias, second, is_loreft) for preft_rl.kernels' ReFT ops (PrefillReftFunction, reft_prefill_reference)."""
        return self.rotate_layer.weight, self.learned_source.bias, self.learned_source.weight, True

    def is_identity(self) -> bool:
        """True when the edit is exactly zero for every input (W = R and b = 0), as at initialisation."""
        with torch.no_grad():
            return not self.learned_source.bias.any() and torch.equal(self.learned_source.weight, self.rotate_layer.weight)



class DiReftIntervention(nn.Module):
    """DiReFT: `h + W2^T (W1 h + b)`; W1 [r, d] random (`learned_source`), W2 [r, d] zero (`proj_layer`)."""

    def __init__(
        self, d: int, r: int, dropout: float, device: torch.device, init_scale: float | None, generator: torch.Generator | None
    ) -> None:
        super().__init__()
        self.learned_source = nn.Linear(d, r, device=device, dtype=torch.float32)
        _uniform_(self.learned_source.weight, init_scale or 1.0 / math.sqrt(d), generator)
        nn.init.zeros_(self.learned_source.bias)
        self.proj_layer = nn.Linear(d, r, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.proj_layer.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(first, bias, second, is_loreft) for preft_rl.kernels' ReFT ops (PrefillReftFunction, reft_prefill_reference)."""
        return self.learned_source.weight, self.learned_source.bias, self.proj_layer.weight, False

    def is_identity(self) -> bool:
        """True when the edit is exactly zero for every input (W2 = 0), as at initialisation."""
        return not self.proj_layer.weight.any()


class ReftLayer(nn.Module):
    """The interventions after one decoder layer, keyed by group ('shared', or 'first' and 'last').

    Attached to the decoder layer as `preft_reft` and run by a forward hook on that layer's output
    (the residual stream). Groups run in order, so with separate first/last interventions a token in
    both ranges gets 'first', then 'last'.
    """

    def __init__(self, interventions: dict[str, nn.Module], slot: SelectionSlot) -> None:
        super().__init__()
        self.interventions = nn.ModuleDict(interventions)
        self._slot = slot

    def is_identity(self) -> bool:
        return all(intervention.is_identity() for intervention in self.interventions.values())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        selection = self._slot.current
        if selection is None:
            return hidden
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, d)
        for group, intervention in self.interventions.items():
            if group not in selection.groups:
                continue
            first, bias, second, is_loreft = intervention.kernel_weights()
            no_dropout = isinstance(intervention.dropout, nn.Identity)
            if no_dropout and resolve_backend(None, hidden, first, bias, second) == "triton":
                flat = PrefillReftFunction.apply(flat, first, bias, second, selection.row_metadata(group), is_loreft)
            else:  # the kernels' torch reference: the one torch copy of this maths
                flat = reft_prefill_reference(flat, first, bias, second, selection.rows(group), is_loreft,
                                              None if no_dropout else intervention.dropout)
        return flat.reshape(hidden.shape)


# ---------------------------------------------------------------------------------------------- many tenants
class TenantLoraLinear(nn.Module):
    """Many tenants' LoRA on one linear layer: each row's prompt tokens get its own tenant's `scaling B_t A_t x`, in one
    multi-adapter op (preft_rl.kernels.prefill_lora_multi). The tenants' A and B are their own parameters (PEFT-style
    `lora_A.<tenant>.weight`), stacked per call for the tenants that have rows in it."""

    def __init__(self, base_layer: nn.Module, tenants: dict[str, PreftLoraLinear], slot: SelectionSlot) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({name: module.lora_A for name, module in tenants.items()})
        self.lora_B = nn.ModuleDict({name: module.lora_B for name, module in tenants.items()})
        self.scaling = next(iter(tenants.values())).scaling
        self._slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, d_out)
        selection = self._slot.current
        if selection is None:
            return out
        a = torch.stack([self.lora_A[name].weight for name in selection.active])  # (N, r, d_in)
        b = torch.stack([self.lora_B[name].weight for name in selection.active])  # (N, d_out, r)
        out2 = prefill_lora_multi(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), a, b, float(self.scaling),
                                  selection.metadata("prompt"))
        return out2.reshape(out.shape)


class TenantReftLayer(nn.Module):
    """Many tenants' ReFT interventions after one decoder layer: each row's tokens of a group get its own tenant's
    intervention, in one multi-adapter op per group (prefill_loreft_multi / prefill_direft_multi)."""

    def __init__(self, tenants: dict[str, ReftLayer], slot: SelectionSlot) -> None:
        super().__init__()
        self.tenants = nn.ModuleDict(tenants)
        self._slot = slot

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        selection = self._slot.current
        if selection is None:
            return hidden
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, d)
        for group in next(iter(self.tenants.values())).interventions:
            if group not in selection.groups:
                continue
            weights = [self.tenants[name].interventions[group].kernel_weights() for name in selection.active]
            first, bias, second = (torch.stack([w[i] for w in weights]) for i in range(3))  # (N, r, d), (N, r), (N, r, d)
            metadata = selection.metadata(group)
            if weights[0][3]:  # LoReFT: first = R, second = W
                flat = prefill_loreft_multi(flat, first, second, bias, metadata)
            else:  # DiReFT: first = W1, second = W2
                flat = prefill_direft_multi(flat, first, bias, second, metadata)
        return flat.reshape(hidden.shape)
