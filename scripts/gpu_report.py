"""Write docs/benchmarks/kernels-gpu.md from the files scripts/gpu_check.sh leaves in its work folder.

    python3 scripts/gpu_report.py WORK_DIR OUT_MD

WORK_DIR holds env.txt (versions), pytest.log (the native kernel tests), kernels.json (preft_rl.reports.kernels)
and train_step.json (scripts/gpu_train_step.py); any of them may be missing (a stage that failed or timed out),
and the report says so instead of leaving the section out.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"missing ({type(err).__name__}: {err})"


def _num(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def pytest_section(log: Path) -> list[str]:
    lines = ["## 1. Kernel tests, compiled natively (not interpreted)", ""]
    if not log.exists():
        return lines + ["pytest.log is missing: the stage did not run.", ""]
    text = log.read_text()
    summary = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|skipped)\b.* in [\d.]+s", ln)]
    failed = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    lines.append(f"`{summary[-1].strip('= ')}`" if summary else "No pytest summary line: the run was cut short (see gpu_check.log).")
    if failed:
        lines += ["", "Failures:", "", *[f"- `{ln}`" for ln in failed[:30]]]
    return lines + [""]


def kernels_section(data) -> list[str]:
    lines = ["## 2. Kernel benchmark (`python3 -m preft_rl.reports.kernels`)", ""]
    if isinstance(data, str):
        return lines + [f"kernels.json {data}", ""]
    lines += [
        f"Ceilings measured in the same run on {data['device']}: {_num(data['bandwidth_gbs'], '.0f')} GB/s "
        f"(1 GiB device-to-device copy, read + write), {_num(data['peak_tflops'], '.0f')} TFLOP/s (8192^3 bf16 matmul). "
        "bf16, d = 4096, every token assigned to a random adapter of N, L2 flushed before each call; "
        "floor = max(unavoidable bytes / bandwidth, flops / peak).",
        "",
        "| op | backend | T | N | r | us | GB/s | TFLOP/s | floor us | x floor | graph us | graph x floor |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        graph = r.get("graph_us")
        graph_x = graph / r["floor_us"] if graph and r["floor_us"] else None
        lines.append(f"| {r['op']} | {r['backend']} | {r['T']} | {r['N']} | {r['r']} | {r['us']:.1f} | {_num(r['gbps'], '.0f')} | "
                     f"{_num(r['tflops'], '.2f')} | {_num(r['floor_us'], '.1f')} | {_num(r['x_floor'], '.2f')} | "
                     f"{_num(graph, '.1f')} | {_num(graph_x, '.2f')} |")
    target = {r["backend"]: r for r in data["rows"] if r["op"] == "lora" and (r["T"], r["N"], r["r"]) == (8192, 64, 16)}
    if "triton" in target:
        tri = target["triton"]
        line = f"Target (T=8192, N=64, r=16): Triton {tri['us']:.1f} us = {tri['x_floor']:.2f}x the floor (goal <= 1.5x)"
        if "torch" in target:
            line += f"; {target['torch']['us'] / tri['us']:.1f}x faster than the torch reference"
        line += "; vLLM's shrink+expand: " + (f"{target['vllm']['us']:.1f} us" if "vllm" in target else "not measured (no vLLM on the machine)")
        lines += ["", line + "."]
    return lines + [""]


def train_section(data) -> list[str]:
    lines = ["## 3. Training step on an 8B-shaped random Llama (`scripts/gpu_train_step.py`)", ""]
    if isinstance(data, str):
        return lines + [f"train_step.json {data}", ""]
    cfg, train, layer = data["config"], data["train"], data["layer"]
    lines += [
        f"{'Llama-3-8B' if data['shape'] == '8b' else data['shape']} shape ({train['base_params'] / 1e9:.2f} B parameters, {train['weights_gib']:.1f} GiB of {data['dtype']} weights), "
        f"random weights, SDPA attention, on {data['device']}. One micro-batch as GRPO packs it: {cfg['groups']} prompts x "
        f"{cfg['generations']} completions, prompt {cfg['prompt_len']} tokens, completions up to {cfg['completion_len']} "
        f"({train['tokens']} real tokens, {train['prompt_tokens']} of them prompt tokens). Loss = the trainer's completion "
        f"log-prob path; rank {cfg['rank']}; median of {cfg['repeats']} steps after a warm-up.",
        "",
        "| variant | tokens | s / step | x preft-lora | peak GiB | adapter params |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ref = train.get("preft-lora", {}).get("seconds")
    for name, row in train.items():
        if not isinstance(row, dict):
            continue
        if "seconds" not in row:
            lines.append(f"| {name} | {row.get('tokens', '?')} | {row.get('error', '?')} | | | {row.get('adapter_params', 0):,} |")
            continue
        ratio = _num(row["seconds"] / ref, ".2f") if ref else "-"
        lines.append(f"| {name} | {row['tokens']} | {row['seconds']:.3f} | {ratio} | {_num(row['peak_gib'], '.1f')} | {row['adapter_params']:,} |")
    lines += ["", f"One LoRA layer ({layer['d_in']} -> {layer['d_out']}, r={layer['rank']}) fwd+bwd over {layer['rows']} rows, "
              f"{layer['prompt_rows']} of them prompt rows:"]
    for backend in ("torch", "triton"):
        if backend in layer:
            lines.append(f"- {backend}: {layer[backend]['seconds'] * 1e3:.2f} ms")
    if "max_grad_diff" in layer:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in layer["max_grad_diff"].items())
        lines.append(f"- largest gradient difference, Triton vs torch, relative to the largest gradient: {diffs}")
    return lines + [""]


def main(argv: list[str]) -> None:
    work, out = Path(argv[0]), Path(argv[1])
    env = (work / "env.txt").read_text().strip() if (work / "env.txt").exists() else "env.txt missing"
    lines = [
        "# Kernels and a training step on a GPU",
        "",
        "Written by `bash scripts/gpu_check.sh` (see its header for the stages). Machine and versions:",
        "",
        "```",
        env,
        "```",
        "",
        *pytest_section(work / "pytest.log"),
        *kernels_section(_load(work / "kernels.json")),
        *train_section(_load(work / "train_step.json")),
    ]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
