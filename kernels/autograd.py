"""Differentiable single-adapter prefill-only ops for the trainer: one adapter, applied at the selected
(prompt) tokens only, gradients for the input and every adapter weight.

    prefill_lora(base_out, x, lora_a, lora_b, scaling, prompt_rows)   base_out + s * B A x   at prompt rows
    prefill_loreft(h, rotation, weight, bias, prompt_rows)            h + R^T (W h + b - R h) at prompt rows
    prefill_direft(h, weight, bias, proj, prompt_rows)                h + W2^T (W1 h + b)     at prompt rows

All return a new tensor equal to the input (bit for bit) outside the prompt rows. `prompt_rows` is a bool
mask over the leading dims of the input, or flat row indices. On CUDA the forward and backward run the
Triton kernels (the multi-adapter kernels with a one-adapter metadata, plus a weight-gradient reduction);
on CPU, or with backend="torch", they are plain differentiable torch expressions, which double as the
reference the Triton gradients are tested against. No dropout: modules with dropout > 0 keep torch.

Backward math (row form, P prompt rows, g = upstream gradient at those rows):
    LoRA    low = x A^T,  gb = g B:   dx = s gb A,  dA = s gb^T x,  dB = s g^T low
    ReFT    low = h P1^T + b, out = h + low P2, gl = g P2^T:
            dh = g + gl P1,  dP1 = gl^T h,  db = sum(gl),  dP2 = low^T g
            (LoReFT: P1 = W - R, P2 = R, so dW = dP1 and dR = dP2 - dP1)
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend
from .metadata import AdapterTokenMetadata


def _flat_rows(prompt_rows: torch.Tensor, lead_shape: torch.Size, num_rows: int) -> torch.Tensor:
    """(P,) int64 sorted unique flat row indices from a bool mask over `lead_shape` or from indices."""
    if prompt_rows.dtype == torch.bool:
        if prompt_rows.shape != lead_shape:
            raise ValueError(f"prompt_rows mask has shape {tuple(prompt_rows.shape)}; expected {tuple(lead_shape)}")
        return prompt_rows.reshape(-1).nonzero().squeeze(1)
    rows = torch.unique(prompt_rows.reshape(-1).long())
    if rows.numel() and (rows[0] < 0 or rows[-1] >= num_rows):
        raise ValueError(f"prompt_rows indices must lie in [0, {num_rows}); got {rows[0].item()}..{rows[-1].item()}")
    return rows


# ---------------------------------------------------------------- LoRA


class PrefillLoraFunction(torch.autograd.Function):
    """Triton forward/backward of `base_out + s * (x A^T) B^T` at the metadata's rows (2-D inputs)."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling: float, metadata: AdapterTokenMetadata):
        from . import triton_common as common
        from . import triton_lora as tlora

        scale = torch.full((1,), scaling, dtype=torch.float32, device=x.device)
        rank = lora_a.shape[0]
        fp32_dot = common.use_fp32_dot(x.dtype, lora_a.dtype, lora_b.dtype)
        config = tlora.choose_config(metadata, x.shape[1], rank, rank, fp32_dot, x.device)
        low = tlora.lora_shrink(x, lora_a[None], metadata, config).sum(0)  # (P, r) fp32
        out = base_out.clone()
        tlora.lora_expand(low[None], lora_b[None], out, scale, metadata, (lora_b.shape[0],), config)
        ctx.save_for_backward(x, lora_a, lora_b, low, scale)
        ctx.token_meta, ctx.scaling = metadata, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from . import triton_common as common
        from . import triton_grad
        from . import triton_lora as tlora

        x, lora_a, lora_b, low, scale = ctx.saved_tensors
        metadata, rows = ctx.token_meta, ctx.token_meta.sorted_token_indices
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            rank = lora_a.shape[0]
            fp32_dot = common.use_fp32_dot(grad_out.dtype, lora_b.dtype, lora_a.dtype)
            config = tlora.choose_config(metadata, grad_out.shape[1], rank, rank, fp32_dot, x.device)
            grad_low = tlora.lora_shrink(grad_out, lora_b.T[None], metadata, config).sum(0)  # (P, r) = g B
            if need_x:
                grad_x = torch.zeros_like(x)
                tlora.lora_expand(grad_low[None], lora_a.T[None], grad_x, scale, metadata, (x.shape[1],), config)
            if need_a:
                grad_a = triton_grad.gathered_outer(grad_low, x, rows, ctx.scaling).to(lora_a.dtype)  # (r, d_in)
        if need_b:
            grad_b = triton_grad.gathered_outer(low, grad_out, rows, ctx.scaling).T.to(lora_b.dtype)  # (D_out, r)
        return grad_out, grad_x, grad_a, grad_b, None, None


def lora_prefill_reference(base_out, x, lora_a, lora_b, scaling: float, rows: torch.Tensor, dropout=None) -> torch.Tensor:
    """Differentiable torch version on 2-D inputs; `rows` (P,) int64. The one torch copy of training-time LoRA: the
    HF adapter module runs it on CPU (and with dropout, applied to the prompt rows' input)."""
    x_rows = x[rows].to(torch.float32)  # (P, d_in)
    if dropout is not None:
        x_rows = dropout(x_rows)
    low = x_rows @ lora_a.to(torch.float32).T  # (P, r)
    delta = (low @ lora_b.to(torch.float32).T) * scaling  # (P, D_out)
    return base_out.index_put((rows,), (base_out[rows].to(torch.float32) + delta).to(base_out.dtype))


def prefill_lora(
    base_out: torch.Tensor,  # (..., D_out) the base layer's output
    x: torch.Tensor,  # (..., d_in) the layer input
    lora_a: torch.Tensor,  # (r, d_in)
    lora_b: torch.Tensor,  # (D_out, r)
    scaling: float,  # alpha / r
    prompt_rows: torch.Tensor,  # bool (...) True at prompt tokens, or flat row indices (P,)
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`base_out + scaling * B A x` at prompt rows, `base_out` elsewhere; differentiable in x, A, B, base_out."""
    d_in, d_out = x.shape[-1], base_out.shape[-1]
    if lora_a.shape[1] != d_in or lora_b.shape != (d_out, lora_a.shape[0]) or base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"expected base_out (..., D_out), x (..., d_in), lora_a (r, d_in), lora_b (D_out, r); got base_out "
            f"{tuple(base_out.shape)}, x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    out2, x2 = base_out.reshape(-1, d_out), x.reshape(-1, d_in)
    rows = _flat_rows(prompt_rows, x.shape[:-1], x2.shape[0])
    if rows.numel() == 0:
        return base_out
    if resolve_backend(backend, base_out, x, lora_a, lora_b) == "torch":
        out = lora_prefill_reference(out2, x2, lora_a, lora_b, scaling, rows)
    else:
        metadata = AdapterTokenMetadata.for_rows(rows, x2.shape[0])
        out = PrefillLoraFunction.apply(out2, x2, lora_a, lora_b, float(scaling), metadata)
    return out.reshape(base_out.shape)


# ---------------------------------------------------------------- ReFT


class PrefillReftFunction(torch.autograd.Function):
    """Triton forward/backward of LoReFT (`is_loreft`: first = R, second = W) or DiReFT (first = W1,
    second = W2) at the metadata's rows, on 2-D h; weights (r, d), bias (r,)."""

    @staticmethod
    def forward(ctx, h, first, bias, second, metadata: AdapterTokenMetadata, is_loreft: bool):
        from .triton_reft import lowrank_residual

        out = h.clone()
        if is_loreft:  # out = h + (h (W - R)^T + b) R
            rotation, weight = first, second
            low = lowrank_residual(out, weight[None], rotation[None], metadata, q1=rotation[None], bias=bias[None], store_low=True)
        else:  # out = h + (h W1^T + b) W2
            weight, proj = first, second
            low = lowrank_residual(out, weight[None], proj[None], metadata, bias=bias[None], store_low=True)
        ctx.save_for_backward(h, first, second, low)
        ctx.token_meta, ctx.is_loreft, ctx.bias_dtype = metadata, is_loreft, bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .triton_grad import gathered_outer
        from .triton_reft import lowrank_residual

        h, first, second, low = ctx.saved_tensors
        metadata, rows = ctx.token_meta, ctx.token_meta.sorted_token_indices
        if ctx.is_loreft:
            rotation, weight = first, second
            p1 = weight.to(torch.float32) - rotation.to(torch.float32)  # (r, d), read matrix
            p2 = rotation
        else:
            p1, p2 = first, second
        grad_h = torch.clone(grad_out, memory_format=torch.contiguous_format)
        # grad_h[rows] += (g P2^T) P1; grad_low = g P2^T is kept for the weight gradients.
        grad_low = lowrank_residual(grad_h, p2[None], p1[None], metadata, store_low=True)  # (P, r) fp32
        grad_p1 = gathered_outer(grad_low, h, rows)  # (r, d)
        grad_p2 = gathered_outer(low, grad_out, rows)  # (r, d)
        grad_bias = grad_low.sum(0)
        if ctx.is_loreft:
            grad_first, grad_second = grad_p2 - grad_p1, grad_p1  # dR, dW
        else:
            grad_first, grad_second = grad_p1, grad_p2  # dW1, dW2
        return (
            grad_h,
            grad_first.to(first.dtype),
            grad_bias.to(ctx.bias_dtype),
            grad_second.to(second.dtype),
            None,
            None,
        )


def reft_prefill_reference(h, first, bias, second, rows: torch.Tensor, is_loreft: bool, dropout=None) -> torch.Tensor:
    """Differentiable torch version on 2-D h; LoReFT: first = R, second = W; DiReFT: first = W1, second = W2. The one
    torch copy of training-time ReFT: the HF adapter module runs it on CPU (with dropout on the low-rank activations)."""
    h_rows = h[rows].to(torch.float32)  # (P, d)
    if is_loreft:
        rotation = first.to(torch.float32)
        low = h_rows @ (second.to(torch.float32) - rotation).T + bias.to(torch.float32)  # (P, r)
        write = rotation
    else:
        low = h_rows @ first.to(torch.float32).T + bias.to(torch.float32)  # (P, r)
        write = second.to(torch.float32)
    if dropout is not None:
        low = dropout(low)
    return h.index_put((rows,), (h_rows + low @ write).to(h.dtype))


def _prefill_reft(h, first, bias, second, prompt_rows, is_loreft: bool, backend: str | None) -> torch.Tensor:
    d = h.shape[-1]
    if first.dim() != 2 or first.shape[1] != d or second.shape != first.shape or bias.shape != first.shape[:1]:
        raise ValueError(
            f"expected h (..., d), weights (r, d) and bias (r,); got h {tuple(h.shape)}, "
            f"{tuple(first.shape)}, {tuple(second.shape)}, bias {tuple(bias.shape)}"
        )
    h2 = h.reshape(-1, d)
    rows = _flat_rows(prompt_rows, h.shape[:-1], h2.shape[0])
    if rows.numel() == 0:
        return h
    if resolve_backend(backend, h, first, bias, second) == "torch":
        out = reft_prefill_reference(h2, first, bias, second, rows, is_loreft)
    else:
        metadata = AdapterTokenMetadata.for_rows(rows, h2.shape[0])
        out = PrefillReftFunction.apply(h2, first, bias, second, metadata, is_loreft)
    return out.reshape(h.shape)


def prefill_loreft(
    h: torch.Tensor,  # (..., d)
    rotation: torch.Tensor,  # (r, d) R, orthonormal rows
    weight: torch.Tensor,  # (r, d) W
    bias: torch.Tensor,  # (r,) b
    prompt_rows: torch.Tensor,  # bool (...) or flat row indices (P,)
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`h + R^T (W h + b - R h)` at prompt rows, h elsewhere; differentiable in h, R, W, b."""
    return _prefill_reft(h, rotation, bias, weight, prompt_rows, True, backend)


def prefill_direft(
    h: torch.Tensor,  # (..., d)
    weight: torch.Tensor,  # (r, d) W1
    bias: torch.Tensor,  # (r,) b
    proj: torch.Tensor,  # (r, d) W2
    prompt_rows: torch.Tensor,  # bool (...) or flat row indices (P,)
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`h + W2^T (W1 h + b)` at prompt rows, h elsewhere; differentiable in h, W1, b, W2."""
    return _prefill_reft(h, weight, bias, proj, prompt_rows, False, backend)
