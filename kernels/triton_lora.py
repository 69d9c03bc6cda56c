"""Triton multi-adapter LoRA: a shrink kernel (x -> fp32 low-rank activations) and an expand kernel
(low-rank activations -> scaled delta added into `out`), both driven by `AdapterTokenMetadata` tiles.

Each program handles one tile of up to BLOCK_M tokens of a single adapter (tokens grouped by adapter in
the metadata), so an adapter's weight tile is loaded once per token tile. The grid is exactly the tile
list: no program is launched for an adapter with no tokens, and tokens with index -1 are never visited.

Shrink splits d_in across SPLIT_K programs when there are too few tiles to fill the GPU; the partial sums
go to separate fp32 slabs that the expand kernel adds in a fixed order, so results are deterministic (no
atomics) and no reduction kernel or zero-fill is needed. The low-rank buffer is indexed by position in
`sorted_token_indices`, so the two kernels may tile the tokens differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .metadata import AdapterTokenMetadata


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # (T, K) any float dtype
    a_ptr,  # (N, SR, K) stacked A, any strides
    partials_ptr,  # (SPLIT_K, T_active, SR) fp32, contiguous
    tiles_ptr,  # (3, n_tiles) int32: adapter slot, first sorted position, group end
    n_tiles,
    sorted_rows_ptr,  # (T_active,) int32
    T_active,
    K,
    SR,
    stride_xm,
    stride_xk,
    stride_an,
    stride_ar,
    stride_ak,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    adapter = tl.load(tiles_ptr + tile).to(tl.int64)
    start = tl.load(tiles_ptr + n_tiles + tile)
    end = tl.load(tiles_ptr + 2 * n_tiles + tile)

    offs_m = start + tl.arange(0, BLOCK_M)  # positions in sorted_token_indices
    m_mask = offs_m < end
    # Rows past the group end read token row 0: a valid address whose result is never stored.
    rows = tl.load(sorted_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < SR
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    a_ptrs = a_ptr + adapter * stride_an + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # (BLOCK_K, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        if EVEN_K:
            x_tile = tl.load(x_ptrs + k0 * stride_xk)
            a_tile = tl.load(a_ptrs + k0 * stride_ak, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = offs_k < K - k0
            x_tile = tl.load(x_ptrs + k0 * stride_xk, mask=k_mask[None, :], other=0.0)
            a_tile = tl.load(a_ptrs + k0 * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(x_tile.to(tl.float32), a_tile.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(x_tile, a_tile, acc)

    out_ptrs = partials_ptr + pid_k * T_active * SR + offs_m[:, None] * SR + offs_r[None, :]
    tl.store(out_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_expand_kernel(
    partials_ptr,  # (SPLIT_K, T_active, SR) fp32
    b_ptr,  # (N, D_out, R) stacked B, any strides
    out_ptr,  # (T, D_out), updated in place
    scaling_ptr,  # (N,) fp32
    tiles_ptr,  # (3, n_tiles) int32
    n_tiles,
    sorted_rows_ptr,  # (T_active,) int32
    col_blocks_ptr,  # (3, n_col_blocks) int32: rank offset of the slice, first column, slice end column
    n_col_blocks,
    T_active,
    SR,
    R,
    stride_bn,
    stride_bd,
    stride_br,
    stride_om,
    stride_od,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    col_block = tl.program_id(1)
    adapter = tl.load(tiles_ptr + tile).to(tl.int64)
    start = tl.load(tiles_ptr + n_tiles + tile)
    end = tl.load(tiles_ptr + 2 * n_tiles + tile)
    rank0 = tl.load(col_blocks_ptr + col_block)
    col0 = tl.load(col_blocks_ptr + n_col_blocks + col_block)
    col_end = tl.load(col_blocks_ptr + 2 * n_col_blocks + col_block)

    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    rows = tl.load(sorted_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R

    # Low-rank activations of this slice: the split-K partials summed in a fixed order, then scaled
    # (scaling the small (BLOCK_M, R) operand rather than the (BLOCK_M, BLOCK_N) product).
    low_ptrs = partials_ptr + offs_m[:, None] * SR + (rank0 + offs_r)[None, :]
    low_mask = m_mask[:, None] & r_mask[None, :]
    low = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        low += tl.load(low_ptrs + split * T_active * SR, mask=low_mask, other=0.0)
    low = low * tl.load(scaling_ptr + adapter)

    offs_n = col0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col_end
    b_ptrs = b_ptr + adapter * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bd
    b_tile = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_N)
    if FP32_DOT:
        delta = tl.dot(low, b_tile.to(tl.float32), input_precision=FP32_PRECISION)
    else:
        delta = tl.dot(low.to(b_tile.dtype), b_tile)  # tensor cores, fp32 accumulator

    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_od
    out_mask = m_mask[:, None] & n_mask[None, :]
    base = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (base + delta).to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class LoraLaunchConfig:
    block_m: int  # tokens per tile (both kernels)
    shrink_block_k: int  # d_in chunk per shrink iteration
    shrink_block_r: int  # rank columns per shrink program
    split_k: int  # shrink programs sharing one tile's d_in
    expand_block_n: int  # output columns per expand program
    expand_warps: int = 4
    shrink_warps: int = 4
    shrink_stages: int = 3


# Launch parameters are data. Chosen from the sm_90 compile of each kernel (registers, spills, shared
# memory: none of these spills); the timings that would tune them come from `python -m
# preft_rl.reports.kernels` on the GPU. Keys: whether the dot operands are upcast to fp32 (FP32_DOT).
SHRINK_BLOCK_K = {False: 128, True: 32}
SHRINK_MAX_BLOCK_R = 64  # wider ranks (fused slices) take several rank blocks; x re-reads hit L2
EXPAND_BLOCK_N = {False: 128, True: 64}
MAX_SPLIT_K = 8
MAX_RANK = 128  # ranks above this take backend='torch' (the tile configs below are checked up to 128)
# LoRA's own tile heights, measured on an H200 with scripts/tune_lora_kernel.py (docs/benchmarks/kernels-gpu.md): at
# 128 tokens per adapter (T=8192, N=64) 16-token tiles beat 64 by 1.7x at r=16 and 1.3x at r=64 (more programs over
# the SMs; the expand dominates), while at 256 tokens per adapter (T=2048, N=8) 64 was best.
LORA_BLOCK_M_BY_GROUP_SIZE = ((128, 16), (None, 64))


def choose_config(metadata: AdapterTokenMetadata, d_in: int, sr: int, rank: int, fp32_dot: bool, device) -> LoraLaunchConfig:
    """Launch parameters for one call (and the rank check, done here so that nothing launches first)."""
    if rank > MAX_RANK:
        raise ValueError(f"LoRA rank {rank} exceeds the kernels' maximum {MAX_RANK}; use backend='torch'")
    block_m = common.tile_height(metadata, LORA_BLOCK_M_BY_GROUP_SIZE)
    block_k = SHRINK_BLOCK_K[fp32_dot]
    block_r = common.dot_block(sr, SHRINK_MAX_BLOCK_R)
    programs = sum(-(-count // block_m) for count in metadata.counts_host) * triton.cdiv(sr, block_r)
    split_k = 1
    # Split d_in while the programs do not fill one wave of the GPU and each split keeps >= 4 iterations
    # (each program pipelines its own loads, so one wave already keeps enough bytes in flight).
    while split_k < MAX_SPLIT_K and programs * split_k < common.sm_count(device) and d_in >= 8 * split_k * block_k:
        split_k *= 2
    expand_warps = 4 if rank <= 16 else 8  # the (BLOCK_M, BLOCK_N) fp32 tile plus a wide rank would spill at 4
    return LoraLaunchConfig(block_m, block_k, block_r, split_k, EXPAND_BLOCK_N[fp32_dot], expand_warps)


@lru_cache(maxsize=64)
def _column_blocks(widths: tuple[int, ...], rank: int, block_n: int, device: torch.device) -> torch.Tensor:
    """(3, n_col_blocks) int32: per expand column block its slice's rank offset, first column and slice end.
    Blocks never straddle two slices, so one dot per program serves one slice."""
    rank_offsets, firsts, ends = [], [], []
    col = 0
    for s, width in enumerate(widths):
        for first in range(col, col + width, block_n):
            rank_offsets.append(s * rank)
            firsts.append(first)
            ends.append(col + width)
        col += width
    return torch.tensor([rank_offsets, firsts, ends], dtype=torch.int32).to(device)


def lora_shrink(
    x: torch.Tensor,  # (T, K)
    lora_a: torch.Tensor,  # (N, SR, K), any strides
    metadata: AdapterTokenMetadata,
    config: LoraLaunchConfig,
) -> torch.Tensor:
    """(split_k, T_active, SR) fp32 partial sums of x[rows] @ A[adapter].T; their sum over dim 0 is the result."""
    num_active, sr, k = metadata.num_active_tokens, lora_a.shape[1], lora_a.shape[2]
    partials = common.workspace((config.split_k, num_active, sr), x.device)
    tiles = metadata.tiles(config.block_m)
    grid = (tiles.shape[1], triton.cdiv(sr, config.shrink_block_r), config.split_k)
    common.launch(
        _lora_shrink_kernel,
        grid,
        x,
        lora_a,
        partials,
        tiles,
        tiles.shape[1],
        metadata.sorted_token_indices,
        num_active,
        k,
        sr,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        BLOCK_M=config.block_m,
        BLOCK_R=config.shrink_block_r,
        BLOCK_K=config.shrink_block_k,
        SPLIT_K=config.split_k,
        EVEN_K=k % config.shrink_block_k == 0,
        FP32_DOT=common.use_fp32_dot(x.dtype, lora_a.dtype),
        FP32_PRECISION=common.FP32_PRECISION,
        num_warps=config.shrink_warps,
        num_stages=config.shrink_stages,
    )
    return partials


def lora_expand(
    partials: torch.Tensor,  # (split_k, T_active, S * R) fp32
    lora_b: torch.Tensor,  # (N, D_out, R), any strides
    out: torch.Tensor,  # (T, D_out), updated in place
    scaling: torch.Tensor,  # (N,) fp32
    metadata: AdapterTokenMetadata,
    widths: tuple[int, ...],  # output slice widths, sum D_out
    config: LoraLaunchConfig,
) -> None:
    rank = lora_b.shape[2]
    tiles = metadata.tiles(config.block_m)
    col_blocks = _column_blocks(widths, rank, config.expand_block_n, out.device)
    grid = (tiles.shape[1], col_blocks.shape[1])
    common.launch(
        _lora_expand_kernel,
        grid,
        partials,
        lora_b,
        out,
        scaling,
        tiles,
        tiles.shape[1],
        metadata.sorted_token_indices,
        col_blocks,
        col_blocks.shape[1],
        partials.shape[1],
        partials.shape[2],
        rank,
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_M=config.block_m,
        BLOCK_N=config.expand_block_n,
        BLOCK_R=common.dot_block(rank, MAX_RANK),  # the whole rank in one dot
        SPLIT_K=partials.shape[0],
        FP32_DOT=common.use_fp32_dot(lora_b.dtype),
        FP32_PRECISION=common.FP32_PRECISION,
        num_warps=config.expand_warps,
        num_stages=1,
    )


def lora_forward(
    out: torch.Tensor,  # (T, D_out)
    x: torch.Tensor,  # (T, d_in)
    lora_a: torch.Tensor,  # (N, S * R, d_in)
    lora_b: torch.Tensor,  # (N, D_out, R)
    scaling: torch.Tensor,  # (N,) fp32
    metadata: AdapterTokenMetadata,
    widths: tuple[int, ...],
    config: LoraLaunchConfig | None = None,
) -> None:
    """Two launches: shrink, then expand into `out`. Callers have checked shapes and `not metadata.is_empty`."""
    if config is None:
        fp32_dot = common.use_fp32_dot(x.dtype, lora_a.dtype, lora_b.dtype)
        config = choose_config(metadata, x.shape[1], lora_a.shape[1], lora_b.shape[2], fp32_dot, x.device)
    partials = lora_shrink(x, lora_a, metadata, config)
    lora_expand(partials, lora_b, out, scaling, metadata, widths, config)
