"""Helpers shared by the Triton launchers: the single launch point, scratch buffers and the dot-precision rule.

Dot precision (a constexpr `FP32_DOT` in every kernel, not a second kernel):
- bf16/fp16 operands of one dtype on a GPU go to `tl.dot` as they are (tensor cores), fp32 accumulator;
- fp32 operands, mixed dtypes (e.g. bf16 activations with fp32 trainer weights), or the Triton
  interpreter (where bf16 arithmetic is broken) upcast the loaded tiles to fp32 first. On a GPU those
  dots use "tf32x3" (three TF32 tensor-core passes, close to fp32 accuracy; plain fp32 "ieee" dots run on
  FMA units and spill registers at these tile sizes); the interpreter computes them in true fp32 ("ieee").
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import torch
import triton

from .dispatch import triton_interpreting

LAUNCHES: Counter[str] = Counter()  # kernel name -> launches so far; tests read it to prove "launched nothing"
POISON_WORKSPACES = False  # tests set True: scratch buffers start as NaN so any unwritten entry that is read shows
FP32_PRECISION = "ieee" if triton_interpreting() else "tf32x3"  # input_precision of upcast (FP32_DOT) dots


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Every Triton launch in this package goes through here."""
    LAUNCHES[kernel.fn.__name__] += 1
    kernel[grid](*args, **meta)


def workspace(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An fp32 scratch buffer every entry of which the producing kernel writes."""
    buffer = torch.empty(shape, dtype=torch.float32, device=device)
    if POISON_WORKSPACES:
        buffer.fill_(float("nan"))
    return buffer


def use_fp32_dot(*dtypes: torch.dtype) -> bool:
    """Whether a kernel whose dot operands have `dtypes` must upcast them (see the module docstring)."""
    return triton_interpreting() or len(set(dtypes)) > 1 or torch.float32 in dtypes


# (mean tokens per active adapter up to, tile height). Small groups (many adapters, short prompts or
# chunks) waste less of a small tile; large groups amortise each weight tile over more tokens.
BLOCK_M_BY_GROUP_SIZE = ((16, 16), (48, 32), (None, 64))


def tile_height(metadata, table: tuple = BLOCK_M_BY_GROUP_SIZE) -> int:
    """Tokens per tile (BLOCK_M) for this step's adapter groups, from a (mean group size up to, BLOCK_M) table."""
    mean_group = -(-metadata.num_active_tokens // len(metadata.counts_host))
    return next(bm for limit, bm in table if limit is None or mean_group <= limit)


def dot_block(size: int, cap: int) -> int:
    """A power-of-two block >= 16 (the smallest `tl.dot` accepts) covering `size`, at most `cap`."""
    return max(16, min(cap, triton.next_power_of_2(size)))


@lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
