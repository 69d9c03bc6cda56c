"""Triton multi-adapter ReFT: one fused kernel for `h[t] += (h[t] @ (P1 - Q1)^T + b) @ P2` in place.

    LoReFT forward   P1 = W,  Q1 = R, b = b, P2 = R     h + R^T (W h + b - R h)
    DiReFT forward   P1 = W1, no Q1,  b = b, P2 = W2    h + W2^T (W1 h + b)
    their backward   the same form on the output gradient (see autograd.py)

A program owns a tile of up to BLOCK_M tokens of one adapter and the whole hidden width: phase 1 reads
its rows and reduces them to the (BLOCK_M, R) low-rank activations, phase 2 re-reads the rows (from L2)
and writes `h + low @ P2`. No other program touches those rows, so the update is safe in place and no
intermediate goes through global memory unless STORE_LOW asks for it (training saves it for backward).
(P1 - Q1) is formed in fp32 inside the kernel, so LoReFT at its initialisation (W = R) is an exact no-op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .metadata import AdapterTokenMetadata

MAX_RANK = 128  # ranks above this take backend='torch' (the tile configs below are checked up to 128)


@triton.jit
def _lowrank_residual_kernel(
    h_ptr,  # (T, D), updated in place
    p1_ptr,  # (N, R, D)
    q1_ptr,  # (N, R, D), subtracted from P1 when SUBTRACT_Q1 (else unused)
    bias_ptr,  # (N, R) when HAS_BIAS (else unused)
    p2_ptr,  # (N, R, D)
    low_ptr,  # (T_active, R) fp32 when STORE_LOW (else unused)
    tiles_ptr,  # (3, n_tiles) int32: adapter slot, first sorted position, group end
    n_tiles,
    sorted_rows_ptr,  # (T_active,) int32
    D,
    R,
    stride_hm,
    stride_hd,
    stride_p1n,
    stride_p1r,
    stride_p1d,
    stride_q1n,
    stride_q1r,
    stride_q1d,
    stride_bn,
    stride_br,
    stride_p2n,
    stride_p2r,
    stride_p2d,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SUBTRACT_Q1: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_LOW: tl.constexpr,
    FP32_DOT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    adapter = tl.load(tiles_ptr + tile).to(tl.int64)
    start = tl.load(tiles_ptr + n_tiles + tile)
    end = tl.load(tiles_ptr + 2 * n_tiles + tile)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(sorted_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_d[None, :] * stride_hd  # (BLOCK_M, BLOCK_D)

    # Phase 1: low = h[rows] @ (P1 - Q1)^T + b, fp32 accumulator.
    p1_ptrs = p1_ptr + adapter * stride_p1n + offs_r[None, :] * stride_p1r + offs_d[:, None] * stride_p1d
    q1_ptrs = q1_ptr + adapter * stride_q1n + offs_r[None, :] * stride_q1r + offs_d[:, None] * stride_q1d
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = offs_d < D - d0
        w_mask = d_mask[:, None] & r_mask[None, :]
        h_tile = tl.load(h_ptrs + d0 * stride_hd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        p_tile = tl.load(p1_ptrs + d0 * stride_p1d, mask=w_mask, other=0.0)  # (BLOCK_D, BLOCK_R)
        if SUBTRACT_Q1:
            q_tile = tl.load(q1_ptrs + d0 * stride_q1d, mask=w_mask, other=0.0)
            p_tile = p_tile.to(tl.float32) - q_tile.to(tl.float32)
            if not FP32_DOT:
                p_tile = p_tile.to(h_tile.dtype)
        if FP32_DOT:
            acc = tl.dot(h_tile.to(tl.float32), p_tile.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(h_tile, p_tile, acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + adapter * stride_bn + offs_r * stride_br, mask=r_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if STORE_LOW:
        tl.store(low_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])

    # Phase 2: h[rows] += low @ P2, one rounding per element.
    p2_ptrs = p2_ptr + adapter * stride_p2n + offs_r[:, None] * stride_p2r + offs_d[None, :] * stride_p2d
    for d0 in range(0, D, BLOCK_D):
        d_mask = offs_d < D - d0
        p2_tile = tl.load(p2_ptrs + d0 * stride_p2d, mask=r_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_D)
        if FP32_DOT:
            delta = tl.dot(acc, p2_tile.to(tl.float32), input_precision=FP32_PRECISION)
        else:
            delta = tl.dot(acc.to(p2_tile.dtype), p2_tile)
        h_mask = m_mask[:, None] & d_mask[None, :]
        h_tile = tl.load(h_ptrs + d0 * stride_hd, mask=h_mask, other=0.0).to(tl.float32)
        tl.store(h_ptrs + d0 * stride_hd, (h_tile + delta).to(h_ptr.dtype.element_ty), mask=h_mask)


def lowrank_residual(
    h: torch.Tensor,  # (T, D), updated in place
    p1: torch.Tensor,  # (N, R, D)
    p2: torch.Tensor,  # (N, R, D)
    metadata: AdapterTokenMetadata,
    *,
    q1: torch.Tensor | None = None,  # (N, R, D): use P1 - Q1 in phase 1
    bias: torch.Tensor | None = None,  # (N, R)
    store_low: bool = False,
) -> torch.Tensor | None:
    """One launch. Returns the fp32 low-rank activations (T_active, R), rows in sorted order, if store_low."""
    rank = p1.shape[1]
    if rank > MAX_RANK:
        raise ValueError(f"ReFT rank {rank} exceeds the kernels' maximum {MAX_RANK}; use backend='torch'")
    operands = [h.dtype, p1.dtype, p2.dtype] + ([q1.dtype] if q1 is not None else [])
    fp32_dot = common.use_fp32_dot(*operands)
    # Launch parameters are data, chosen from the sm_90 compile so that no configuration spills registers:
    # the (BLOCK_M, R) activations stay live through phase 2, so wide ranks take shorter tiles.
    block_r = common.dot_block(rank, MAX_RANK)
    wide = block_r > 64
    block_m = min(common.tile_height(metadata), (16 if fp32_dot else 32) if wide else 64)
    block_d = 32 if fp32_dot else (64 if wide else 128)
    tiles = metadata.tiles(block_m)
    low = common.workspace((metadata.num_active_tokens, rank), h.device) if store_low else h  # h: unused dummy
    q1_arg = q1 if q1 is not None else p1
    bias_arg = bias if bias is not None else p1
    common.launch(
        _lowrank_residual_kernel,
        (tiles.shape[1],),
        h,
        p1,
        q1_arg,
        bias_arg,
        p2,
        low,
        tiles,
        tiles.shape[1],
        metadata.sorted_token_indices,
        h.shape[1],
        rank,
        h.stride(0),
        h.stride(1),
        *p1.stride(),
        *q1_arg.stride(),
        bias_arg.stride(0),
        bias_arg.stride(1),
        *p2.stride(),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        SUBTRACT_Q1=q1 is not None,
        HAS_BIAS=bias is not None,
        STORE_LOW=store_low,
        FP32_DOT=fp32_dot,
        FP32_PRECISION=common.FP32_PRECISION,
        num_warps=8 if wide else 4,
        num_stages=2,
    )
    return low if store_low else None
