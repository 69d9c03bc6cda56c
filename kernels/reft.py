"""Multi-adapter prefill-only ReFT interventions on the residual stream, in place on `h (T, d)` at tokens whose
adapter slot is >= 0 (rows with -1 are untouched, bit for bit):

    LoReFT   h + R^T (W h + b - R h)     rotation R (N, r, d) with orthonormal rows, weight W (N, r, d), bias b (N, r)
    DiReFT   h + W2^T (W1 h + b)         weight W1 (N, r, d), bias b (N, r), proj W2 (N, r, d)

Adapters of rank below the stacked r are zero-padded (zero rows of R, W, W1, W2 and zero bias entries),
which is exact: the padded components are 0 and add exact zeros. All arithmetic is fp32; each edited row
is rounded to h's dtype once. The Triton path lives in `triton_reft.py` and is imported only when it runs.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend
from .lora import check_metadata
from .metadata import AdapterTokenMetadata


def _grouped_edit(h: torch.Tensor, metadata: AdapterTokenMetadata, edit) -> torch.Tensor:
    """Apply `edit(adapter, h_group fp32) -> delta fp32` per adapter group and write h + delta back once."""
    if metadata.is_empty:
        return h
    rows = metadata.sorted_token_indices.long()  # (T_active,)
    h_rows = h[rows].to(torch.float32)  # (T_active, d), grouped by adapter
    deltas = [edit(a, group) for a, group in zip(metadata.active_ids_host, h_rows.split(metadata.counts_host))]
    h.index_put_((rows,), (h_rows + torch.cat(deltas)).to(h.dtype))
    return h


def loreft_forward_reference(
    h: torch.Tensor,  # (T, d), edited in place
    rotation: torch.Tensor,  # (N, r, d) R
    weight: torch.Tensor,  # (N, r, d) W
    bias: torch.Tensor,  # (N, r) b
    metadata: AdapterTokenMetadata,
) -> torch.Tensor:
    def edit(a: int, h_group: torch.Tensor) -> torch.Tensor:
        R = rotation[a].to(torch.float32)  # (r, d)
        low = h_group @ (weight[a].to(torch.float32) - R).T + bias[a].to(torch.float32)  # (m, r)
        return low @ R  # (m, d)

    return _grouped_edit(h, metadata, edit)


def direft_forward_reference(
    h: torch.Tensor,  # (T, d), edited in place
    weight: torch.Tensor,  # (N, r, d) W1
    bias: torch.Tensor,  # (N, r) b
    proj: torch.Tensor,  # (N, r, d) W2
    metadata: AdapterTokenMetadata,
) -> torch.Tensor:
    def edit(a: int, h_group: torch.Tensor) -> torch.Tensor:
        low = h_group @ weight[a].to(torch.float32).T + bias[a].to(torch.float32)  # (m, r)
        return low @ proj[a].to(torch.float32)  # (m, d)

    return _grouped_edit(h, metadata, edit)


def _check_reft_args(h: torch.Tensor, metadata: AdapterTokenMetadata, bias: torch.Tensor, **mats: torch.Tensor) -> None:
    if h.dim() != 2:
        raise ValueError(f"h must be (T, d), got shape {tuple(h.shape)}")
    first = next(iter(mats.values()))
    num_slots, rank = first.shape[0], first.shape[1]
    for name, m in mats.items():
        if m.shape != (num_slots, rank, h.shape[1]):
            raise ValueError(f"{name} has shape {tuple(m.shape)}; expected ({num_slots}, {rank}, {h.shape[1]}) (N, r, d)")
    if bias.shape != (num_slots, rank):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({num_slots}, {rank}) (N, r)")
    for name, t in (*mats.items(), ("bias", bias)):
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}; put all operands on one device")
    check_metadata(metadata, h.shape[0], num_slots, h.device)


def apply_loreft(
    h: torch.Tensor,  # (T, d) residual stream, edited in place
    rotation: torch.Tensor,  # (N, r, d) R
    weight: torch.Tensor,  # (N, r, d) W
    bias: torch.Tensor,  # (N, r) b
    metadata: AdapterTokenMetadata,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`h[t] = h[t] + R^T (W h[t] + b - R h[t])` with each token's adapter; returns h. Nothing runs when empty."""
    if metadata.is_empty:
        return h
    _check_reft_args(h, metadata, bias, rotation=rotation, weight=weight)
    if resolve_backend(backend, h, rotation, weight, bias) == "torch":
        return loreft_forward_reference(h, rotation, weight, bias, metadata)
    from . import triton_reft

    triton_reft.lowrank_residual(h, weight, rotation, metadata, q1=rotation, bias=bias)
    return h


def apply_direft(
    h: torch.Tensor,  # (T, d) residual stream, edited in place
    weight: torch.Tensor,  # (N, r, d) W1
    bias: torch.Tensor,  # (N, r) b
    proj: torch.Tensor,  # (N, r, d) W2
    metadata: AdapterTokenMetadata,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """`h[t] = h[t] + W2^T (W1 h[t] + b)` with each token's adapter; returns h. Nothing runs when empty."""
    if metadata.is_empty:
        return h
    _check_reft_args(h, metadata, bias, weight=weight, proj=proj)
    if resolve_backend(backend, h, weight, bias, proj) == "torch":
        return direft_forward_reference(h, weight, bias, proj, metadata)
    from . import triton_reft

    triton_reft.lowrank_residual(h, weight, proj, metadata, bias=bias)
    return h
