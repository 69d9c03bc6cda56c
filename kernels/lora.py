"""Multi-adapter prefill-only LoRA: `out[t] += scaling[i] * B_i A_i x[t]` for every token t whose adapter
slot i = token_adapter_index[t] is >= 0; rows with -1 are left untouched, bit for bit.

Weight layout (one stacked tensor per projection, one slot per adapter):

    lora_a  (N, S * R, d_in)   A of every slot. Output slice s (q, k, v of a fused qkv; gate, up of a
                               fused gate_up) uses rows [s * R, (s + 1) * R): the slices share one input,
                               so their A matrices are stacked along the rank axis and x is read once.
    lora_b  (N, D_out, R)      B of every slot, the slices' B matrices stacked along the output axis;
                               output slice s covers columns [c_s, c_s + D_s) of `out` and of lora_b.
    scaling (N,)               alpha / r of every slot (a float means the same for all).

Rank padding: an adapter of rank r < R is stored zero-padded (rows r..R-1 of each slice of A and columns
r..R-1 of B are zero). This is exact, not approximate: the padded rank components are exactly 0 * x = 0
(for finite x) and contribute exact zeros to every sum, so any rank up to R is served by one stacked tensor.

Numerics: low-rank activations and every accumulation are fp32; `out` is read, added to in fp32 and rounded
once. The Triton path lives in `triton_lora.py` and is imported only when it runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import resolve_backend
from .metadata import AdapterTokenMetadata


def lora_forward_reference(
    out: torch.Tensor,  # (T, D_out) modified in place at rows with an adapter
    x: torch.Tensor,  # (T, d_in)
    lora_a: torch.Tensor,  # (N, S * R, d_in)
    lora_b: torch.Tensor,  # (N, D_out, R)
    scaling: torch.Tensor,  # (N,) fp32
    metadata: AdapterTokenMetadata,
    output_slices: Sequence[int] | None = None,  # (D_0, ..., D_{S-1}), sums to D_out; None = one slice
    *,
    by_runs: bool | None = None,  # None: by runs when they average >= 6 tokens (see below)
) -> torch.Tensor:
    """Pure-torch path: the oracle for the Triton kernels and the CPU serving path.

    Two strategies with the same math (fp32 low-rank activations, `out` read, added to in fp32, rounded once):
    - by runs: walk runs of consecutive rows that share an adapter (a request's prompt tokens are consecutive
      rows) and add into `out`'s row block in place; no gather, no scatter, one small matmul pair per run.
    - by adapter: gather each adapter's rows, one matmul pair per adapter, scatter the deltas back.
    Runs win unless they are short. Measured on 2 CPU cores, 4096 tokens through SmolLM2's gate_up (rank 16):
    runs of 64 tokens 10 ms by runs vs 30-35 ms by adapter (and 83 ms before either, against 110 ms for the
    base projection); runs of 8 tokens 27-32 vs 42 ms; runs of 4 tokens 53-69 vs 42 ms; the number of
    adapters barely matters. So runs are used when they average at least 6 tokens.
    """
    if metadata.is_empty:
        return out
    widths = _output_slices(output_slices, lora_b.shape[1])
    if by_runs is None:
        by_runs = metadata.num_active_tokens >= 6 * len(metadata.runs())
    if by_runs:
        _lora_by_runs(out, x, lora_a, lora_b, scaling, metadata, widths)
    else:
        _lora_by_adapter(out, x, lora_a, lora_b, scaling, metadata, widths)
    return out


def _lora_by_runs(out, x, lora_a, lora_b, scaling, metadata, widths) -> None:
    rank = lora_b.shape[2]
    columns = [sum(widths[:s]) for s in range(len(widths))]
    for start, end, slot in metadata.runs():
        low = x[start:end].to(torch.float32) @ lora_a[slot].to(torch.float32).T  # (m, S * R)
        low.mul_(scaling[slot])
        for s, (col, width) in enumerate(zip(columns, widths)):
            b_s = lora_b[slot, col : col + width].to(torch.float32).T  # (R, D_s)
            block = out[start:end, col : col + width]  # a view: written in place
            if out.dtype == torch.float32:
                block.addmm_(low[:, s * rank : (s + 1) * rank], b_s)
            else:
                block.copy_(torch.addmm(block.to(torch.float32), low[:, s * rank : (s + 1) * rank], b_s))


def _lora_by_adapter(out, x, lora_a, lora_b, scaling, metadata, widths) -> None:
    rank = lora_b.shape[2]
    rows = metadata.sorted_token_indices.long()  # (T_active,)
    x_rows = x[rows].to(torch.float32)  # (T_active, d_in), grouped by adapter
    deltas = []
    for slot, x_group in zip(metadata.active_ids_host, x_rows.split(metadata.counts_host)):
        low = (x_group @ lora_a[slot].to(torch.float32).T).mul_(scaling[slot])  # (m, S * R)
        b_slices = lora_b[slot].to(torch.float32).split(widths)  # S x (D_s, R)
        deltas.append(torch.cat([low[:, s * rank : (s + 1) * rank] @ b_s.T for s, b_s in enumerate(b_slices)], dim=1))
    delta = torch.cat(deltas)  # (T_active, D_out)
    if out.dtype == torch.float32:
        out.index_add_(0, rows, delta)  # rows are distinct, so this is one add per element
    else:
        out.index_put_((rows,), (out[rows].to(torch.float32) + delta).to(out.dtype))


def apply_lora(
    out: torch.Tensor,  # (T, D_out) base layer output, updated in place
    x: torch.Tensor,  # (T, d_in) layer input
    lora_a: torch.Tensor,  # (N, S * R, d_in)
    lora_b: torch.Tensor,  # (N, D_out, R)
    scaling: torch.Tensor | float,  # (N,) or one float for all slots
    metadata: AdapterTokenMetadata,
    *,
    output_slices: Sequence[int] | None = None,  # (D_0, ..., D_{S-1}); None = one slice of width D_out
    backend: str | None = None,  # None (auto), "torch" or "triton"; see dispatch.py
) -> torch.Tensor:
    """Add each token's LoRA delta into `out` in place; rows whose adapter index is -1 are not touched.
    Returns `out`. A step with no adapter tokens returns immediately without launching anything."""
    if metadata.is_empty:
        return out
    widths = check_lora_args(out, x, lora_a, lora_b, metadata, output_slices)
    scaling = scaling_tensor(scaling, lora_a.shape[0], x.device)
    if resolve_backend(backend, out, x, lora_a, lora_b) == "torch":
        return lora_forward_reference(out, x, lora_a, lora_b, scaling, metadata, widths)
    from . import triton_lora

    triton_lora.lora_forward(out, x, lora_a, lora_b, scaling, metadata, widths)
    return out


def scaling_tensor(scaling: torch.Tensor | float, num_slots: int, device: torch.device) -> torch.Tensor:
    """(N,) fp32 on `device` from a float or a per-slot tensor."""
    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (num_slots,):
            raise ValueError(f"scaling has shape {tuple(scaling.shape)}; expected ({num_slots},), one per adapter slot")
        return scaling.to(device=device, dtype=torch.float32).contiguous()
    return torch.full((num_slots,), float(scaling), dtype=torch.float32, device=device)


def _output_slices(output_slices: Sequence[int] | None, d_out: int) -> tuple[int, ...]:
    widths = (d_out,) if output_slices is None else tuple(int(w) for w in output_slices)
    if sum(widths) != d_out or any(w <= 0 for w in widths):
        raise ValueError(f"output_slices {widths} must be positive widths summing to lora_b.shape[1] = {d_out}")
    return widths


def check_lora_args(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    metadata: AdapterTokenMetadata,
    output_slices: Sequence[int] | None,
) -> tuple[int, ...]:
    """Validate shapes and devices once per call (host-only checks, no sync); returns the slice widths."""
    if x.dim() != 2 or out.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(
            "expected x (T, d_in), out (T, D_out), lora_a (N, S*R, d_in), lora_b (N, D_out, R); got "
            f"x {tuple(x.shape)}, out {tuple(out.shape)}, lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}"
        )
    widths = _output_slices(output_slices, lora_b.shape[1])
    num_slots, rank = lora_b.shape[0], lora_b.shape[2]
    if lora_a.shape != (num_slots, len(widths) * rank, x.shape[1]):
        raise ValueError(
            f"lora_a has shape {tuple(lora_a.shape)}; with lora_b {tuple(lora_b.shape)}, {len(widths)} output "
            f"slice(s) and x {tuple(x.shape)} it must be ({num_slots}, {len(widths) * rank}, {x.shape[1]})"
        )
    if out.shape != (x.shape[0], lora_b.shape[1]):
        raise ValueError(f"out has shape {tuple(out.shape)}; expected ({x.shape[0]}, {lora_b.shape[1]})")
    check_metadata(metadata, x.shape[0], num_slots, x.device)
    for name, t in (("out", out), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put all operands on one device")
    return widths


def check_metadata(metadata: AdapterTokenMetadata, num_tokens: int, num_slots: int, device: torch.device) -> None:
    if metadata.num_tokens != num_tokens:
        raise ValueError(f"metadata covers {metadata.num_tokens} tokens but the input has {num_tokens} rows")
    if metadata.max_adapter_id >= num_slots:
        raise ValueError(
            f"token_adapter_index uses slot {metadata.max_adapter_id} but the stacked weights hold {num_slots} slots"
        )
    if metadata.device != device:
        raise ValueError(f"metadata is on {metadata.device} but the tensors are on {device}; build it with device=")
