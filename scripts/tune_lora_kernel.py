"""Tune the multi-adapter LoRA kernels' launch parameters on a GPU: coordinate descent over LoraLaunchConfig.

    python3 scripts/tune_lora_kernel.py --json tune.json          # on a CUDA machine (preft_rl importable)

For each shape (the target T=8192, N=64, r=16, d=4096 and a few others, bf16, every token on a random adapter) it
starts from the library's own choice (triton_lora.choose_config), times shrink and expand separately, then changes one
launch parameter at a time, keeping a change when the whole op (shrink + expand) gets faster, for two passes. Every
candidate's output is checked against the torch reference before it is timed; a config that is wrong or fails to
compile is recorded and skipped. Times are medians with the L2 flushed before each call (preft_rl.reports.kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from preft_rl.kernels import AdapterTokenMetadata, apply_lora
from preft_rl.kernels import triton_common as common
from preft_rl.kernels import triton_lora as tlora
from preft_rl.reports.kernels import cuda_time, graph_time, lora_cost, lora_problem, measure_ceilings

SPACE = {
    "block_m": [16, 32, 64, 128],
    "shrink_block_k": [32, 64, 128, 256],
    "shrink_block_r": [16, 32, 64],
    "split_k": [1, 2, 4, 8],
    "expand_block_n": [32, 64, 128, 256],
    "expand_warps": [2, 4, 8],
    "shrink_warps": [2, 4, 8],
    "shrink_stages": [2, 3, 4, 5],
}


def tune_shape(T: int, N: int, r: int, d: int, flush: torch.Tensor, ceilings: tuple[float, float], passes: int,
               device: torch.device = torch.device("cuda")) -> dict:
    x, out0, lora_a, lora_b, index = lora_problem(T, N, r, d, device)
    meta = AdapterTokenMetadata.build(index)
    scaling = torch.ones(N, device=device)
    widths = (d,)
    expected = out0.clone()
    apply_lora(expected, x, lora_a, lora_b, scaling, meta, backend="torch")
    moved, flops = lora_cost(meta, r, d)
    floor = max(moved / ceilings[0], flops / ceilings[1])
    fp32_dot = common.use_fp32_dot(x.dtype, lora_a.dtype, lora_b.dtype)
    default = tlora.choose_config(meta, d, r, r, fp32_dot, device)
    tried: dict[str, dict] = {}
    scratch = out0.clone()  # timed calls accumulate into this; out0 stays the pristine base output

    def evaluate(config: tlora.LoraLaunchConfig) -> float | None:
        key = json.dumps(dataclasses.asdict(config), sort_keys=True)
        if key in tried:
            return tried[key].get("us")
        try:
            out = out0.clone()
            tlora.lora_forward(out, x, lora_a, lora_b, scaling, meta, widths, config)
            err = (out.float() - expected.float()).abs().max().item()
            if err > 0.05 * max(1.0, expected.float().abs().max().item()):
                tried[key] = {"config": dataclasses.asdict(config), "error": f"wrong result (max diff {err:.3g})"}
                return None
            us = cuda_time(lambda: tlora.lora_forward(scratch, x, lora_a, lora_b, scaling, meta, widths, config), flush) * 1e6
        except Exception as exc:  # a config that does not compile (shared memory, registers) is simply not a candidate
            tried[key] = {"config": dataclasses.asdict(config), "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            return None
        tried[key] = {"config": dataclasses.asdict(config), "us": us}
        return us

    # where the time goes with the default config
    partials = tlora.lora_shrink(x, lora_a, meta, default)
    shrink_us = cuda_time(lambda: tlora.lora_shrink(x, lora_a, meta, default), flush) * 1e6
    expand_us = cuda_time(lambda: tlora.lora_expand(partials, lora_b, scratch, scaling, meta, widths, default), flush) * 1e6
    best, best_us = default, evaluate(default)
    for _ in range(passes):
        for name, values in SPACE.items():
            for value in values:
                candidate = dataclasses.replace(best, **{name: value})
                us = evaluate(candidate)
                if us is not None and (best_us is None or us < best_us):
                    best, best_us = candidate, us
    result = {"T": T, "N": N, "r": r, "d": d, "floor_us": floor * 1e6, "default": dataclasses.asdict(default),
              "default_us": tried[json.dumps(dataclasses.asdict(default), sort_keys=True)].get("us"),
              "default_shrink_us": shrink_us, "default_expand_us": expand_us,
              "best": dataclasses.asdict(best), "best_us": best_us, "tried": list(tried.values())}
    print(f"T={T} N={N} r={r}: floor {floor * 1e6:.1f} us; default {result['default_us']:.1f} us (shrink {shrink_us:.1f}, "
          f"expand {expand_us:.1f}); best {best_us:.1f} us = {best_us / (floor * 1e6):.2f}x floor with {result['best']}", flush=True)
    return result


def compare_tile_tables(shapes: list[tuple[int, int, int]], ceilings: tuple[float, float]) -> list[dict]:
    """The LoRA op with the old shared tile table against triton_lora's own, timed by graph replay, side by side."""
    device = torch.device("cuda")
    rows = []
    for T, N, r in shapes:
        x, out, lora_a, lora_b, index = lora_problem(T, N, r, 4096, device)
        meta = AdapterTokenMetadata.build(index)
        scaling = torch.ones(N, device=device)
        fp32_dot = common.use_fp32_dot(x.dtype, lora_a.dtype, lora_b.dtype)
        new = tlora.choose_config(meta, 4096, r, r, fp32_dot, device)
        saved = tlora.LORA_BLOCK_M_BY_GROUP_SIZE
        tlora.LORA_BLOCK_M_BY_GROUP_SIZE = common.BLOCK_M_BY_GROUP_SIZE
        try:
            old = tlora.choose_config(meta, 4096, r, r, fp32_dot, device)
        finally:
            tlora.LORA_BLOCK_M_BY_GROUP_SIZE = saved
        moved, flops = lora_cost(meta, r, 4096)
        floor_us = max(moved / ceilings[0], flops / ceilings[1]) * 1e6
        row = {"T": T, "N": N, "r": r, "floor_us": floor_us, "old": dataclasses.asdict(old), "new": dataclasses.asdict(new)}
        for name, config in (("old", old), ("new", new)):
            row[f"{name}_us"] = graph_time(lambda config=config: tlora.lora_forward(out, x, lora_a, lora_b, scaling, meta, (4096,), config)) * 1e6
        rows.append(row)
        print(f"T={T} N={N} r={r}: floor {floor_us:.1f} us; old tiles (block_m {old.block_m}, split {old.split_k}) "
              f"{row['old_us']:.1f} us = {row['old_us'] / floor_us:.2f}x; new (block_m {new.block_m}, split {new.split_k}) "
              f"{row['new_us']:.1f} us = {row['new_us'] / floor_us:.2f}x; new/old {row['new_us'] / row['old_us']:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--shapes", default="8192,64,16;512,64,16;8192,512,16", help="T,N,r;... (d = 4096)")
    parser.add_argument("--passes", type=int, default=2, help="coordinate-descent passes for the first shape (others: 1)")
    parser.add_argument("--compare", action="store_true", help="only time the old shared tile table against LoRA's own, "
                        "by CUDA-graph replay, at --shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_lora_kernel: no CUDA device; nothing to tune")
        return
    device = torch.device("cuda")
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    ceilings = measure_ceilings(device)
    if args.compare:
        shapes = [tuple(int(v) for v in shape.split(",")) for shape in args.shapes.split(";")]
        rows = compare_tile_tables(shapes, ceilings)
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "bandwidth_gbs": ceilings[0] / 1e9,
                       "peak_tflops": ceilings[1] / 1e12, "timing": "CUDA graph replay, 20 calls", "rows": rows}, f, indent=1)
        return
    results = []
    for i, shape in enumerate(args.shapes.split(";")):
        T, N, r = (int(v) for v in shape.split(","))
        results.append(tune_shape(T, N, r, 4096, flush, ceilings, args.passes if i == 0 else 1))
        with open(args.json, "w") as f:  # after every shape: a timeout keeps what was done
            json.dump({"device": torch.cuda.get_device_name(device), "bandwidth_gbs": ceilings[0] / 1e9,
                       "peak_tflops": ceilings[1] / 1e12, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
