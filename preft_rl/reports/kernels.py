"""Benchmark of the multi-adapter prefill kernels against the torch reference and vLLM's own LoRA ops.

    python -m preft_rl.reports.kernels                   # CUDA: the full table; CPU: a small torch-path timing
    python -m preft_rl.reports.kernels --quick           # only T=8192, N=64, r=16 (the target shape)
    python -m preft_rl.reports.kernels --json out.json   # also write the device, its ceilings and the rows as JSON

On CUDA it first measures the device's ceilings (a large device-to-device copy for memory bandwidth, a
large bf16 matmul for tensor-core throughput), then times every op over T in {512, 8192}, N in {1, 64, 512},
r in {8, 16, 64} at d = 4096 in bf16, with every token assigned to a random adapter (a prefill step) and
the L2 cache flushed before each timed call. Each row gives achieved GB/s and TFLOP/s from the bytes and
flops the op cannot avoid, the floor max(bytes / bandwidth, flops / peak) and the time as a multiple of it.
The LoRA target: within 1.5x of the floor at T=8192, N=64, r=16, and no slower than vLLM's shrink+expand.
The metadata build (once per step, shared by all layers) is timed separately.

vLLM is imported here only for the baseline and only when the CUDA build is installed; the library itself
imports vLLM in preft_rl/engine/ alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from preft_rl.kernels import AdapterTokenMetadata, apply_direft, apply_lora, apply_loreft

BF16_BYTES = 2


@dataclass
class Row:
    op: str
    backend: str
    T: int
    N: int
    r: int
    d: int
    us: float  # median time per call, microseconds (eager calls, L2 flushed: includes host launch latency)
    gbps: float  # unavoidable bytes / time
    tflops: float  # flops / time
    floor_us: float  # max(bytes / bandwidth, flops / peak) with the measured ceilings
    x_floor: float  # us / floor_us
    graph_us: float | None = None  # per call by CUDA-graph replay (Triton rows on CUDA): no host launch latency


# ---------------------------------------------------------------- timing


def cuda_time(fn, flush: torch.Tensor, budget_s: float = 1.0, max_reps: int = 50) -> float:
    """Median seconds of fn() with the L2 flushed before each call (events bracket fn only)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = max(3, min(max_reps, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(reps):
        flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_time(fn, calls: int = 20, reps: int = 5) -> float:
    """Seconds per call of fn from CUDA-graph replays of `calls` back-to-back calls (L2-warm between calls, but no
    host launch latency: single eager calls timed by events include Triton's Python launch overhead, which varied
    2-5x between machines of one kind; docs/benchmarks/kernels-gpu.md)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def cpu_time(fn, budget_s: float = 0.5, max_reps: int = 20) -> float:
    fn()
    start = time.perf_counter()
    fn()
    reps = max(2, min(max_reps, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(bytes/s, flop/s) this GPU actually reaches: a 1 GiB copy and an 8192^3 bf16 matmul."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    src = torch.empty(2**29, dtype=torch.bfloat16, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src), flush)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_s = cuda_time(lambda: a @ b, flush)
    return 2 * src.numel() * BF16_BYTES / copy_s, 2 * 8192**3 / mm_s


# ---------------------------------------------------------------- problems


def lora_problem(T: int, N: int, r: int, d: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(T, d, generator=gen, **kw)
    out = torch.randn(T, d, generator=gen, **kw)
    lora_a = torch.randn(N, r, d, generator=gen, **kw) / d**0.5
    lora_b = torch.randn(N, d, r, generator=gen, **kw) / r**0.5
    index = torch.randint(0, N, (T,), generator=gen, device=device, dtype=torch.int32)
    return x, out, lora_a, lora_b, index


def lora_cost(meta: AdapterTokenMetadata, r: int, d: int) -> tuple[int, int]:
    """(bytes, flops) the op cannot avoid: read x rows, read+write out rows, read active adapters' A and B."""
    t, a = meta.num_active_tokens, len(meta.active_ids_host)
    moved = t * d * BF16_BYTES + 2 * t * d * BF16_BYTES + a * 2 * r * d * BF16_BYTES
    return moved, 2 * t * r * 2 * d


def reft_cost(meta: AdapterTokenMetadata, r: int, d: int, mats: int) -> tuple[int, int]:
    """Read h rows, write h rows, read the active adapters' `mats` (r, d) matrices."""
    t, a = meta.num_active_tokens, len(meta.active_ids_host)
    return 2 * t * d * BF16_BYTES + a * mats * r * d * BF16_BYTES, 2 * t * r * 2 * d


def vllm_lora_baseline(x, out, lora_a, lora_b, index):
    """vLLM's own shrink + expand on the same problem, or None when the CUDA build of vLLM is absent."""
    try:
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    except Exception:  # not installed, or the CPU build
        return None
    T, N, r = x.shape[0], lora_a.shape[0], lora_a.shape[1]
    meta = LoRAKernelMeta.make(max_loras=N, max_num_tokens=T, device=x.device)
    meta.prepare_tensors(index)
    try:
        meta_args = meta.meta_args(T, True)  # specialise on the active-adapter count: vLLM's fastest setting
    except TypeError:
        meta_args = meta.meta_args(T)
    buffer = torch.empty(1, T, r, dtype=torch.float32, device=x.device)

    def run():
        lora_shrink(x, [lora_a], buffer, *meta_args, 1.0)
        lora_expand(buffer, [lora_b], out, *meta_args, offset_start=0, add_inputs=True)

    return run


def row(op, backend, T, N, r, d, seconds, cost, ceilings) -> Row:
    moved, flops = cost
    floor = max(moved / ceilings[0], flops / ceilings[1]) if ceilings and moved else float("nan")
    return Row(op, backend, T, N, r, d, seconds * 1e6, moved / seconds / 1e9, flops / seconds / 1e12, floor * 1e6, seconds / floor)


def bench_lora(T, N, r, d, device, timer, ceilings, backends) -> list[Row]:
    x, out, lora_a, lora_b, index = lora_problem(T, N, r, d, device)
    meta = AdapterTokenMetadata.build(index)
    cost = lora_cost(meta, r, d)
    scaling = torch.ones(N, device=device)
    rows = []
    for backend in backends:
        call = lambda backend=backend: apply_lora(out, x, lora_a, lora_b, scaling, meta, backend=backend)  # noqa: E731
        rows.append(row("lora", backend, T, N, r, d, timer(call), cost, ceilings))
        if backend == "triton" and device.type == "cuda":
            rows[-1].graph_us = _graph_us(call)
    if device.type == "cuda":
        try:
            baseline = vllm_lora_baseline(x, out, lora_a, lora_b, index)
            if baseline is not None:
                rows.append(row("lora", "vllm", T, N, r, d, timer(baseline), cost, ceilings))
        except Exception as err:  # a vLLM API change must not cost us the rest of the table
            print(f"vLLM baseline failed at T={T} N={N} r={r}: {type(err).__name__}: {err}")
        rows.append(row("metadata", "build", T, N, r, d, timer(lambda: AdapterTokenMetadata.build(index).tiles(64)), (0, 0), ceilings))
    return rows


def bench_reft(T, N, r, d, device, timer, ceilings, backends) -> list[Row]:
    x, _, first, _, index = lora_problem(T, N, r, d, device)
    second = first.clone()  # LoReFT W = R, DiReFT W2 = 0: no-op edits, so repeated in-place calls stay finite
    zeros = torch.zeros_like(first)
    bias = torch.zeros(N, r, device=device, dtype=torch.bfloat16)
    meta = AdapterTokenMetadata.build(index)
    rows = []
    for backend in backends:
        seconds = timer(lambda: apply_loreft(x, first, second, bias, meta, backend=backend))
        rows.append(row("loreft", backend, T, N, r, d, seconds, reft_cost(meta, r, d, 3), ceilings))
        seconds = timer(lambda: apply_direft(x, first, bias, zeros, meta, backend=backend))
        rows.append(row("direft", backend, T, N, r, d, seconds, reft_cost(meta, r, d, 2), ceilings))
    return rows


def _graph_us(call) -> float | None:
    try:
        return graph_time(call) * 1e6
    except Exception as err:  # a capture problem must not cost the rest of the table
        print(f"CUDA-graph timing failed ({type(err).__name__}: {err}); the eager time stands alone")
        return None


def print_rows(rows: list[Row]) -> None:
    print(f"{'op':<9}{'backend':<8}{'T':>6}{'N':>5}{'r':>4}{'us':>11}{'GB/s':>9}{'TFLOP/s':>9}{'floor us':>10}{'x floor':>9}"
          f"{'graph us':>10}{'x floor':>9}")
    for rw in rows:
        graph = f"{rw.graph_us:>10.1f}{rw.graph_us / rw.floor_us:>9.2f}" if rw.graph_us else ""
        print(
            f"{rw.op:<9}{rw.backend:<8}{rw.T:>6}{rw.N:>5}{rw.r:>4}{rw.us:>11.1f}{rw.gbps:>9.0f}{rw.tflops:>9.2f}"
            f"{rw.floor_us:>10.1f}{rw.x_floor:>9.2f}{graph}"
        )


def summarize_target(rows: list[Row]) -> None:
    """The acceptance line for the prefill LoRA op at T=8192, N=64, r=16."""
    pick = {rw.backend: rw for rw in rows if rw.op == "lora" and (rw.T, rw.N, rw.r) == (8192, 64, 16)}
    if "triton" not in pick:
        return
    tri = pick["triton"]
    line = f"target T=8192 N=64 r=16: triton {tri.us:.1f} us = {tri.x_floor:.2f}x floor (goal <= 1.5x)"
    if tri.graph_us:
        line += f"; by graph replay {tri.graph_us:.1f} us = {tri.graph_us / tri.floor_us:.2f}x"
    if "vllm" in pick:
        line += f"; vLLM {pick['vllm'].us:.1f} us -> triton is {pick['vllm'].us / tri.us:.2f}x vLLM's speed (goal >= 1)"
    else:
        line += "; vLLM baseline unavailable (needs the CUDA build of vllm)"
    print(line)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the target shape T=8192, N=64, r=16")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    summary: dict = {"device": "cpu", "bandwidth_gbs": None, "peak_tflops": None}
    if torch.cuda.is_available():
        device = torch.device("cuda")
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        bandwidth, peak = measure_ceilings(device)
        summary = {"device": torch.cuda.get_device_name(device), "bandwidth_gbs": bandwidth / 1e9, "peak_tflops": peak / 1e12}
        print(f"{summary['device']}: measured {bandwidth / 1e9:.0f} GB/s copy, {peak / 1e12:.0f} TFLOP/s bf16 matmul")
        timer = lambda fn: cuda_time(fn, flush)  # noqa: E731
        shapes = [(8192, 64, 16)] if args.quick else [(t, n, r) for t in (512, 8192) for n in (1, 64, 512) for r in (8, 16, 64)]
        for T, N, r in shapes:
            rows += bench_lora(T, N, r, 4096, device, timer, (bandwidth, peak), ("triton", "torch"))
        for T, N, r in [(8192, 64, 16)] if args.quick else [(512, 64, 8), (8192, 1, 8), (8192, 64, 16)]:
            rows += bench_reft(T, N, r, 4096, device, timer, (bandwidth, peak), ("triton", "torch"))
        print_rows(rows)
        summarize_target(rows)
    else:
        print("No CUDA device: timing the torch reference path on CPU at a small shape. GPU numbers (Triton,")
        print("vLLM, GB/s and TFLOP/s against the device's ceilings) need a GPU; run this again on one.")
        torch.set_num_threads(max(1, torch.get_num_threads()))
        for T, N, r in [(512, 8, 16)] if args.quick else [(512, 1, 16), (512, 8, 16), (2048, 8, 16)]:
            rows += bench_lora(T, N, r, 1024, torch.device("cpu"), cpu_time, None, ("torch",))
            rows += bench_reft(T, N, r, 1024, torch.device("cpu"), cpu_time, None, ("torch",))
        print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "rows": [asdict(rw) for rw in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
