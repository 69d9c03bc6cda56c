"""Triton weight-gradient kernel for the training path: `scale * u^T x[rows]`, a (R, D) reduction over tokens.

Every adapter weight gradient of the single-adapter autograd functions has this form: a small fp32
low-rank buffer u (P, R) (saved activations or their gradient, one row per selected token) times the
selected rows of a (T, D) tensor (the input or the output gradient). The token axis is split across
SPLIT_P programs when the (R, D) output alone has too few tiles to fill the GPU; partial sums go to
separate slabs and are added in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common


@triton.jit
def _gathered_outer_kernel(
    u_ptr,  # (P, R) fp32, row p belongs to token rows[p]
    x_ptr,  # (T, D)
    rows_ptr,  # (P,) int32
    partials_ptr,  # (SPLIT_P, R, D) fp32, contiguous
    scale,
    P,
    R,
    D,
    stride_up,
    stride_ur,
    stride_xm,
    stride_xd,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLIT_P: tl.constexpr,
    FP32_DOT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask = offs_r < R
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for p0 in range(pid_s * BLOCK_P, P, SPLIT_P * BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        rows = tl.load(rows_ptr + offs_p, mask=p_mask, other=0).to(tl.int64)
        u_ptrs = u_ptr + offs_p[None, :] * stride_up + offs_r[:, None] * stride_ur
        u_tile = tl.load(u_ptrs, mask=r_mask[:, None] & p_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_P)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd
        x_tile = tl.load(x_ptrs, mask=p_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_P, BLOCK_D)
        if FP32_DOT:
            acc = tl.dot(u_tile, x_tile.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(u_tile.to(x_tile.dtype), x_tile, acc)
    out_ptrs = partials_ptr + pid_s * R * D + offs_r[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, acc * scale, mask=r_mask[:, None] & d_mask[None, :])


MAX_SPLIT_P = 16


def gathered_outer(
    u: torch.Tensor,  # (P, R) fp32
    x: torch.Tensor,  # (T, D)
    rows: torch.Tensor,  # (P,) int32 token rows of x, aligned with u
    scale: float = 1.0,
    split: int | None = None,  # token-axis split; None picks one from the GPU size
) -> torch.Tensor:
    """(R, D) fp32 = scale * u^T @ x[rows]."""
    num_rows, rank = u.shape
    d = x.shape[1]
    fp32_dot = common.use_fp32_dot(x.dtype)
    block_p, block_d = (32, 64) if fp32_dot else (64, 128)
    block_r = common.dot_block(rank, 64)
    programs = triton.cdiv(d, block_d) * triton.cdiv(rank, block_r)
    if split is None:
        split = 1
        while split < MAX_SPLIT_P and programs * split < 2 * common.sm_count(x.device) and num_rows >= 8 * split * block_p:
            split *= 2
    partials = common.workspace((split, rank, d), x.device)
    common.launch(
        _gathered_outer_kernel,
        (triton.cdiv(d, block_d), triton.cdiv(rank, block_r), split),
        u,
        x,
        rows,
        partials,
        float(scale),
        num_rows,
        rank,
        d,
        u.stride(0),
        u.stride(1),
        x.stride(0),
        x.stride(1),
        BLOCK_P=block_p,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        SPLIT_P=split,
        FP32_DOT=fp32_dot,
        FP32_PRECISION=common.FP32_PRECISION,
        num_warps=4,
        num_stages=3,
    )
    return partials[0] if split == 1 else partials.sum(0)
