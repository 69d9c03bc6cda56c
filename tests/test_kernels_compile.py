"""The GPU code path of every Triton kernel, compiled ahead of time for an H100 (sm_90) without a GPU.

The interpreter runs only the upcast (FP32_DOT) branch of each kernel, so this file compiles both branches
to PTX and SASS with Triton's bundled ptxas, with the argument specialisation a real launch gets (16-byte
aligned pointers, unit inner strides) and the launchers' own tile configs, and checks what matters on the
GPU: the bf16 branch feeds bf16 tiles to tensor cores (wgmma / mma), the fp32 branch too (tf32x3), the
shrink's loads are software-pipelined, and no configuration spills registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="ahead-of-time compilation needs the compiler, not the interpreter"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
]

ALIGNED_INTS = ("K", "D", "stride_xm", "stride_an", "stride_ar", "stride_bn", "stride_bd", "stride_om", "stride_hm",
                "stride_p1n", "stride_p1r", "stride_q1n", "stride_q1r", "stride_p2n", "stride_p2r")  # multiples of 16 at d = 4096
UNIT_STRIDES = ("stride_xk", "stride_ak", "stride_br", "stride_od", "stride_hd", "stride_p1d", "stride_q1d", "stride_p2d", "stride_ur", "stride_xd")


def compile_sm90(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    constexprs = {**constexprs, **{n: 1 for n in UNIT_STRIDES if n in names}}
    signature = {n: "i32" for n in names}
    signature.update(pointer_types)
    signature.update({n: "constexpr" for n in constexprs})
    if "scale" in names:
        signature["scale"] = "fp32"
    divisible = [n for n in names if n in pointer_types or n in ALIGNED_INTS]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    ptx = compiled.asm["ptx"]
    return {
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "tensor_cores": "wgmma" in ptx or "mma.sync" in ptx,
        "pipelined": "cp.async" in ptx,
    }


def _have_ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _have_ptxas(), reason="triton's bundled CUDA toolchain (ptxas) is missing")
@pytest.mark.parametrize("fp32_dot", [False, True], ids=["bf16", "fp32"])
def test_every_kernel_compiles_for_sm90_on_tensor_cores_without_spills(fp32_dot):
    from preft_rl.kernels import AdapterTokenMetadata, triton_common, triton_grad, triton_lora, triton_reft

    dt = "*fp32" if fp32_dot else "*bf16"
    precision = "tf32x3"
    # The target shape of the benchmark: T=8192 tokens over 64 adapters, rank 16, d = 4096.
    meta = AdapterTokenMetadata.build(torch.arange(8192, dtype=torch.int32) % 64)
    cfg = triton_lora.choose_config(meta, 4096, 16, 16, fp32_dot, torch.device("cpu"))
    results = {
        "shrink": compile_sm90(
            triton_lora._lora_shrink_kernel,
            dict(x_ptr=dt, a_ptr=dt, partials_ptr="*fp32", tiles_ptr="*i32", sorted_rows_ptr="*i32"),
            dict(BLOCK_M=cfg.block_m, BLOCK_R=cfg.shrink_block_r, BLOCK_K=cfg.shrink_block_k, SPLIT_K=2, EVEN_K=True,
                 FP32_DOT=fp32_dot, FP32_PRECISION=precision),
            cfg.shrink_warps, cfg.shrink_stages,
        ),
        "expand": compile_sm90(
            triton_lora._lora_expand_kernel,
            dict(partials_ptr="*fp32", b_ptr=dt, out_ptr=dt, scaling_ptr="*fp32", tiles_ptr="*i32", sorted_rows_ptr="*i32",
                 col_blocks_ptr="*i32"),
            dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.expand_block_n, BLOCK_R=16, SPLIT_K=2, FP32_DOT=fp32_dot, FP32_PRECISION=precision),
            cfg.expand_warps, 1,
        ),
        "reft": compile_sm90(
            triton_reft._lowrank_residual_kernel,
            dict(h_ptr=dt, p1_ptr=dt, q1_ptr=dt, bias_ptr=dt, p2_ptr=dt, low_ptr="*fp32", tiles_ptr="*i32", sorted_rows_ptr="*i32"),
            dict(BLOCK_M=triton_common.tile_height(meta), BLOCK_R=16, BLOCK_D=32 if fp32_dot else 128, SUBTRACT_Q1=True,
                 HAS_BIAS=True, STORE_LOW=True, FP32_DOT=fp32_dot, FP32_PRECISION=precision),
            4, 2,
        ),
        "weight_grad": compile_sm90(
            triton_grad._gathered_outer_kernel,
            dict(u_ptr="*fp32", x_ptr=dt, rows_ptr="*i32", partials_ptr="*fp32"),
            dict(BLOCK_P=32 if fp32_dot else 64, BLOCK_R=16, BLOCK_D=64 if fp32_dot else 128, SPLIT_P=2, FP32_DOT=fp32_dot,
                 FP32_PRECISION=precision),
            4, 3,
        ),
    }
    for name, r in results.items():
        assert r["stack"] == 0, f"{name} spills {r['stack']} bytes per thread"
        assert r["tensor_cores"], f"{name} does not use tensor cores"
    assert results["shrink"]["pipelined"], "the shrink's x / A loads are not software-pipelined"
