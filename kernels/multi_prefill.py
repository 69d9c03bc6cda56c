"""Differentiable multi-adapter prefill ops for training many tenants' adapters in one forward.

Each row picks its adapter from `token_adapter_index` (-1 = no adapter: completion tokens, padding, rows of a
tenant-less request), so one forward serves every tenant of a step:

    prefill_lora_multi(base_out, x, lora_a, lora_b, scaling, index)   base_out[t] + s_i B_i A_i x[t]
    prefill_loreft_multi(h, rotation, weight, bias, index)            h[t] + R_i^T (W_i h[t] + b_i - R_i h[t])
    prefill_direft_multi(h, weight, bias, proj, index)                h[t] + W2_i^T (W1_i h[t] + b_i)

with i = index[t] >= 0. Weights are stacked per adapter (N, ...); `index` is a tensor over the input's leading
dims (or flat), or an `AdapterTokenMetadata` built once per forward and shared by every layer (building one
costs a device->host sync). Rows with -1 come back bit-identical. Numerics match the single-adapter ops in
autograd.py: fp32 low-rank activations and accumulation, the input read and added to in fp32, rounded once.
Gradients flow to the input, base_out and every adapter's weights; an adapter with no rows gets an exactly-zero
gradient. `scaling` is a constant (no gradient). A step where every row is -1 returns the input itself, so the
weights are then not in the graph (their .grad stays None), as with the single-adapter ops.

Backends (dispatch.py): on CPU, grouped torch: rows gathered per adapter, the single-adapter references
(`lora_prefill_reference`, `reft_prefill_reference`) run once per adapter group, one scatter back; autograd
differentiates it and it is the oracle the Triton path is tested against. On CUDA, Triton: the serving kernels
forward, the same kernels on transposed stacked weights for the input gradient, and the weight gradients reduced
per adapter over its rows (contiguous in the metadata's sorted order; one `gathered_outer` per active adapter).

Backward maths per adapter i over its rows (g = upstream gradient at those rows), as in autograd.py:
    LoRA    low = x A_i^T, gl = g B_i:   dx = s_i gl A_i,  dA_i = s_i gl^T x,  dB_i = s_i g^T low
    ReFT    low = h P1_i^T + b_i, gl = g P2_i:  dh = g + gl P1_i,  dP1_i = gl^T h,  db_i = sum(gl),  dP2_i = low^T g
            (LoReFT: P1 = W - R, P2 = R, so dW = dP1 and dR = dP2 - dP1; DiReFT: P1 = W1, P2 = W2)
"""

from __future__ import annotations

import torch

from .autograd import lora_prefill_reference, reft_prefill_reference
from .dispatch import resolve_backend
from .lora import check_lora_args, scaling_tensor
from .metadata import AdapterTokenMetadata
from .reft import _check_reft_args

TokenAdapters = torch.Tensor | AdapterTokenMetadata


def _metadata(token_adapter_index: TokenAdapters, lead_shape: torch.Size, num_rows: int, device: torch.device) -> AdapterTokenMetadata:
    """Metadata over the `num_rows` flattened rows, from an index shaped like the leading dims (or flat) or as given."""
    if isinstance(token_adapter_index, AdapterTokenMetadata):
        if token_adapter_index.num_tokens != num_rows:
            raise ValueError(
                f"the metadata covers {token_adapter_index.num_tokens} rows but the input has {num_rows} "
                f"(leading dims {tuple(lead_shape)}); build it from this forward's token_adapter_index"
            )
        return token_adapter_index
    index = token_adapter_index
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"token_adapter_index must be an integer tensor (adapter slot, -1 = none); got {index.dtype}")
    if index.shape != lead_shape and index.shape != (num_rows,):
        raise ValueError(
            f"token_adapter_index has shape {tuple(index.shape)}; expected the input's leading dims {tuple(lead_shape)} "
            f"or flat ({num_rows},)"
        )
    return AdapterTokenMetadata.build(index.reshape(-1), device=device)


def _group_rows(metadata: AdapterTokenMetadata):
    """(slot, start, end) per active adapter: its rows are sorted_token_indices[start:end]."""
    start = 0
    for slot, count in zip(metadata.active_ids_host, metadata.counts_host):
        yield slot, start, start + count
        start += count


def _per_adapter_outer(u: torch.Tensor, x: torch.Tensor, metadata: AdapterTokenMetadata, num_slots: int) -> torch.Tensor:
    """(N, R, D) fp32: slot i holds u[group i]^T @ x[rows of group i]; slots without rows are exactly zero."""
    from .triton_grad import gathered_outer

    rows = metadata.sorted_token_indices  # (T_active,) int32, grouped by adapter
    grads = torch.zeros(num_slots, u.shape[1], x.shape[1], dtype=torch.float32, device=x.device)  # (N, R, D)
    for slot, start, end in _group_rows(metadata):
        grads[slot] = gathered_outer(u[start:end], x, rows[start:end])  # (R, D)
    return grads


# ---------------------------------------------------------------- LoRA


def lora_multi_reference(
    base_out: torch.Tensor,  # (T, D_out)
    x: torch.Tensor,  # (T, d_in)
    lora_a: torch.Tensor,  # (N, r, d_in)
    lora_b: torch.Tensor,  # (N, D_out, r)
    scaling: torch.Tensor,  # (N,) fp32
    metadata: AdapterTokenMetadata,
) -> torch.Tensor:
    """Grouped torch path (differentiable, returns a new tensor): the single-adapter reference once per adapter group."""
    if metadata.is_empty:
        return base_out
    rows = metadata.sorted_token_indices.long()  # (T_active,) grouped by adapter
    # unbind, not lora_a[slot]: its backward stacks the slots' gradients once (zeros for slots without rows)
    # instead of adding one full (N, r, d) tensor per group.
    a_slots, b_slots = lora_a.unbind(0), lora_b.unbind(0)
    x_groups = x[rows].split(metadata.counts_host)  # per group (m, d_in)
    base_groups = base_out[rows].split(metadata.counts_host)  # per group (m, D_out)
    edited = []
    for slot, x_group, base_group in zip(metadata.active_ids_host, x_groups, base_groups):
        every = torch.arange(x_group.shape[0], device=x.device)  # (m,) all rows of the group
        edited.append(lora_prefill_reference(base_group, x_group, a_slots[slot], b_slots[slot], scaling[slot], every))
    return base_out.index_put((rows,), torch.cat(edited))  # (T, D_out)


class PrefillLoraMultiFunction(torch.autograd.Function):
    """Triton forward/backward of `base_out[t] + s_i B_i A_i x[t]` at every row with an adapter (2-D inputs)."""

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, scaling: torch.Tensor, metadata: AdapterTokenMetadata):
        from . import triton_common as common
        from . import triton_lora as tlora

        rank = lora_a.shape[1]
        fp32_dot = common.use_fp32_dot(x.dtype, lora_a.dtype, lora_b.dtype)
        config = tlora.choose_config(metadata, x.shape[1], rank, rank, fp32_dot, x.device)
        low = tlora.lora_shrink(x, lora_a, metadata, config).sum(0)  # (T_active, r) fp32, unscaled
        out = base_out.clone()
        tlora.lora_expand(low[None], lora_b, out, scaling, metadata, (lora_b.shape[1],), config)
        ctx.save_for_backward(x, lora_a, lora_b, low, scaling)
        ctx.token_meta = metadata
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from . import triton_common as common
        from . import triton_lora as tlora

        x, lora_a, lora_b, low, scaling = ctx.saved_tensors
        metadata, num_slots, rank = ctx.token_meta, lora_a.shape[0], lora_a.shape[1]
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        grad_x = grad_a = grad_b = None
        slot_scale = scaling[:, None, None]  # (N, 1, 1)
        if need_x or need_a:
            fp32_dot = common.use_fp32_dot(grad_out.dtype, lora_b.dtype, lora_a.dtype)
            config = tlora.choose_config(metadata, grad_out.shape[1], rank, rank, fp32_dot, x.device)
            # The forward kernels on transposed stacks: B_i^T (r, D_out) as the shrink, A_i^T (d_in, r) as the expand.
            grad_low = tlora.lora_shrink(grad_out, lora_b.transpose(1, 2), metadata, config).sum(0)  # (T_active, r) = g B_i
            if need_x:
                grad_x = torch.zeros_like(x)
                tlora.lora_expand(grad_low[None], lora_a.transpose(1, 2), grad_x, scaling, metadata, (x.shape[1],), config)
            if need_a:
                grad_a = (_per_adapter_outer(grad_low, x, metadata, num_slots) * slot_scale).to(lora_a.dtype)  # (N, r, d_in)
        if need_b:
            grad_b_t = _per_adapter_outer(low, grad_out, metadata, num_slots) * slot_scale  # (N, r, D_out)
            grad_b = grad_b_t.transpose(1, 2).contiguous().to(lora_b.dtype)  # (N, D_out, r)
        return grad_out, grad_x, grad_a, grad_b, None, None


def prefill_lora_multi(
    base_out: torch.Tensor,  # (..., D_out) the base layer's output
    x: torch.Tensor,  # (..., d_in) the layer input
    lora_a: torch.Tensor,  # (N, r, d_in) A of every adapter
    lora_b: torch.Tensor,  # (N, D_out, r) B of every adapter
    scaling: torch.Tensor | float,  # (N,) alpha / r per adapter, or one float for all
    token_adapter_index: TokenAdapters,  # int (...) or (T,), -1 = no adapter; or prebuilt metadata
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`base_out + s_i B_i A_i x` at rows of adapter i, `base_out` (bit for bit) at rows with -1; differentiable in
    x, base_out, lora_a and lora_b."""
    d_in, d_out = x.shape[-1], base_out.shape[-1]
    if base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"base_out {tuple(base_out.shape)} and x {tuple(x.shape)} must share their leading dims (..., d)")
    out2, x2 = base_out.reshape(-1, d_out), x.reshape(-1, d_in)  # (T, D_out), (T, d_in)
    metadata = _metadata(token_adapter_index, x.shape[:-1], x2.shape[0], x.device)
    check_lora_args(out2, x2, lora_a, lora_b, metadata, None)
    if metadata.is_empty:
        return base_out
    scale = scaling_tensor(scaling, lora_a.shape[0], x.device).detach()  # (N,) fp32
    if resolve_backend(backend, base_out, x, lora_a, lora_b) == "torch":
        out = lora_multi_reference(out2, x2, lora_a, lora_b, scale, metadata)
    else:
        out = PrefillLoraMultiFunction.apply(out2, x2, lora_a, lora_b, scale, metadata)
    return out.reshape(base_out.shape)


# ---------------------------------------------------------------- ReFT


def reft_multi_reference(
    h: torch.Tensor,  # (T, d)
    first: torch.Tensor,  # (N, r, d) LoReFT R, DiReFT W1
    bias: torch.Tensor,  # (N, r)
    second: torch.Tensor,  # (N, r, d) LoReFT W, DiReFT W2
    metadata: AdapterTokenMetadata,
    is_loreft: bool,
) -> torch.Tensor:
    """Grouped torch path (differentiable, returns a new tensor): the single-adapter reference once per adapter group."""
    if metadata.is_empty:
        return h
    rows = metadata.sorted_token_indices.long()  # (T_active,) grouped by adapter
    first_slots, bias_slots, second_slots = first.unbind(0), bias.unbind(0), second.unbind(0)
    edited = []
    for slot, h_group in zip(metadata.active_ids_host, h[rows].split(metadata.counts_host)):  # (m, d) each
        every = torch.arange(h_group.shape[0], device=h.device)  # (m,)
        edited.append(reft_prefill_reference(h_group, first_slots[slot], bias_slots[slot], second_slots[slot], every, is_loreft))
    return h.index_put((rows,), torch.cat(edited))  # (T, d)


class PrefillReftMultiFunction(torch.autograd.Function):
    """Triton forward/backward of LoReFT (first = R, second = W) or DiReFT (first = W1, second = W2) with each row's
    adapter, on 2-D h; weights (N, r, d), bias (N, r)."""

    @staticmethod
    def forward(ctx, h, first, bias, second, metadata: AdapterTokenMetadata, is_loreft: bool):
        from .triton_reft import lowrank_residual

        out = torch.clone(h, memory_format=torch.contiguous_format)  # (T, d)
        if is_loreft:  # out = h + (h (W - R)^T + b) R
            low = lowrank_residual(out, second, first, metadata, q1=first, bias=bias, store_low=True)  # (T_active, r)
        else:  # out = h + (h W1^T + b) W2
            low = lowrank_residual(out, first, second, metadata, bias=bias, store_low=True)  # (T_active, r)
        ctx.save_for_backward(h, first, second, low)
        ctx.token_meta, ctx.is_loreft, ctx.bias_dtype = metadata, is_loreft, bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .triton_reft import lowrank_residual

        h, first, second, low = ctx.saved_tensors
        metadata, num_slots = ctx.token_meta, first.shape[0]
        if ctx.is_loreft:
            p1 = second.to(torch.float32) - first.to(torch.float32)  # (N, r, d) read matrices W - R
            p2 = first  # R
        else:
            p1, p2 = first, second
        grad_h = torch.clone(grad_out, memory_format=torch.contiguous_format)  # (T, d)
        # grad_h[rows] += (g P2_i^T) P1_i; grad_low = g P2_i^T is kept for the weight gradients.
        grad_low = lowrank_residual(grad_h, p2, p1, metadata, store_low=True)  # (T_active, r) fp32
        grad_p1 = _per_adapter_outer(grad_low, h, metadata, num_slots)  # (N, r, d)
        grad_p2 = _per_adapter_outer(low, grad_out, metadata, num_slots)  # (N, r, d)
        grad_bias = torch.zeros(num_slots, first.shape[1], dtype=torch.float32, device=h.device)  # (N, r)
        for slot, start, end in _group_rows(metadata):  # a per-group sum: deterministic, unlike index_add_ on CUDA
            grad_bias[slot] = grad_low[start:end].sum(0)
        if ctx.is_loreft:
            grad_first, grad_second = grad_p2 - grad_p1, grad_p1  # dR, dW
        else:
            grad_first, grad_second = grad_p1, grad_p2  # dW1, dW2
        return grad_h, grad_first.to(first.dtype), grad_bias.to(ctx.bias_dtype), grad_second.to(second.dtype), None, None


def _prefill_reft_multi(h, first, bias, second, token_adapter_index, is_loreft: bool, backend: str | None, names):
    d = h.shape[-1]
    h2 = h.reshape(-1, d)  # (T, d)
    metadata = _metadata(token_adapter_index, h.shape[:-1], h2.shape[0], h.device)
    _check_reft_args(h2, metadata, bias, **{names[0]: first, names[1]: second})
    if metadata.is_empty:
        return h
    if resolve_backend(backend, h, first, bias, second) == "torch":
        out = reft_multi_reference(h2, first, bias, second, metadata, is_loreft)
    else:
        out = PrefillReftMultiFunction.apply(h2, first, bias, second, metadata, is_loreft)
    return out.reshape(h.shape)


def prefill_loreft_multi(
    h: torch.Tensor,  # (..., d)
    rotation: torch.Tensor,  # (N, r, d) R of every adapter, orthonormal rows
    weight: torch.Tensor,  # (N, r, d) W
    bias: torch.Tensor,  # (N, r) b
    token_adapter_index: TokenAdapters,  # int (...) or (T,), -1 = no adapter; or prebuilt metadata
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`h + R_i^T (W_i h + b_i - R_i h)` at rows of adapter i, h (bit for bit) at rows with -1; differentiable in
    h, R, W, b."""
    return _prefill_reft_multi(h, rotation, bias, weight, token_adapter_index, True, backend, ("rotation", "weight"))


def prefill_direft_multi(
    h: torch.Tensor,  # (..., d)
    weight: torch.Tensor,  # (N, r, d) W1 of every adapter
    bias: torch.Tensor,  # (N, r) b
    proj: torch.Tensor,  # (N, r, d) W2
    token_adapter_index: TokenAdapters,  # int (...) or (T,), -1 = no adapter; or prebuilt metadata
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`h + W2_i^T (W1_i h + b_i)` at rows of adapter i, h (bit for bit) at rows with -1; differentiable in
    h, W1, b, W2."""
    return _prefill_reft_multi(h, weight, bias, proj, token_adapter_index, False, backend, ("weight", "proj"))
