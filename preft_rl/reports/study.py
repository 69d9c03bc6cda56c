"""PreFT vs all-token adapters under the same GRPO trainer: `preft-rl study`.

    preft-rl study --out docs/benchmarks/learning-cpu                      # 2 tasks x 3 methods x 3 seeds, CPU defaults
    preft-rl study --model Qwen/Qwen2.5-0.5B-Instruct --bf16 --max-steps 200 --out outputs/study-qwen   # a GPU

Every run trains one adapter with identical settings (GSM8K_CPU preset unless overridden), differing only in
the adapter: PreFT LoRA, PreFT LoReFT or all-token LoRA. Each run is a child process (a crash loses one run,
and vLLM's memory is returned between runs) that writes `runs/<task>-<method>-s<seed>.json`; a rerun skips
finished runs. The summary (`study.json`, `study.md`, `learning-<task>.png`) has learning curves (mean and
min-max band over seeds), held-out strict accuracy and format rate before and after with 95% paired-bootstrap
intervals (problems x seeds resampled), seconds per step and rollout tokens/s per method, and the ratio of
PreFT's held-out gain to all-token LoRA's.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preft_rl.trainers.presets import GSM8K_CPU

METHODS = {
    "preft-lora": dict(method="lora", r=16, alpha=32, target_modules="all-linear"),
    "preft-loreft": dict(method="loreft", r=8, positions="f5+l5"),
    "all-lora": dict(method="lora", r=16, alpha=32, target_modules="all-linear", adapter_scope="all"),
    # the same PreFT LoRA trained by PPO instead of GRPO (a critic adapter + value head on the same base)
    "ppo-preft-lora": dict(method="lora", r=16, alpha=32, target_modules="all-linear", algorithm="ppo"),
}
DEFAULT_METHODS = ("preft-lora", "preft-loreft", "all-lora")
TASKS = ("gsm8k", "chain_sum")
SHARED_GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"
# Training rewards per task. GSM8K: strict accuracy + format, as the main job (the model solves too few for
# accuracy alone to give any signal). chain_sum: strict + lenient accuracy, no format reward: the model answers
# 13-15% right in some form before training, and with a format reward the policy collapsed within 5 steps to a
# constant '#### 11' (format 0.175 -> 0.995, lenient 0.150 -> 0.025; PreFT LoRA, seed 0, beta 0.04).
TASK_REWARDS = {"gsm8k": ("gsm8k_accuracy", "format")}
DEFAULT_REWARDS = ("gsm8k_accuracy", "gsm8k_last_number")
METRICS = {"strict accuracy": "gsm8k_accuracy_reward", "format rate": "format_reward", "lenient accuracy": "gsm8k_last_number_reward"}


@dataclass
class StudyConfig:
    out: str = "outputs/study"
    model: str = "smollm2-135m-instruct"
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_problems: int = 200
    train_problems: int = 2000  # generated tasks only
    data: str | None = None  # GSM8K source (a jsonl, a folder, 'hub'); default ../shared/data/gsm8k or the hub
    trainer: dict[str, Any] = field(default_factory=lambda: dict(GSM8K_CPU))  # PreftGRPOConfig fields (PPO: ppo_from_grpo)

    def __post_init__(self) -> None:
        if unknown := [t for t in self.tasks if t != "gsm8k" and _generated_task(t) is None]:
            from preft_rl.data.generated import NUMERIC_TASKS

            raise ValueError(f"unknown tasks {unknown}: use 'gsm8k' or one of {list(NUMERIC_TASKS)}")
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise ValueError(f"unknown methods {unknown}: use some of {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed, e.g. [0, 1, 2]")
        if self.eval_problems < 1:
            raise ValueError(f"eval_problems={self.eval_problems} must be >= 1")


def _generated_task(name: str) -> str | None:
    from preft_rl.data.generated import NUMERIC_TASKS

    return name if name in NUMERIC_TASKS else None


def run_name(task: str, method: str, seed: int) -> str:
    return f"{task}-{method}-s{seed}"


# ------------------------------------------------------------------------------------------ one run
def run_one(cfg: StudyConfig, task: str, method: str, seed: int) -> dict[str, Any]:
    """Train one adapter and score the held-out problems before and after (runs in a child process)."""
    from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, PreftPPOConfig, PreftPPOTrainer
    from preft_rl.trainers.presets import ppo_from_grpo
    from preft_rl.rewards import format_reward, gsm8k_accuracy_reward, gsm8k_last_number_reward

    train, held_out = _datasets(cfg, task, seed)
    out = Path(cfg.out) / "runs" / run_name(task, method, seed)
    shutil.rmtree(out, ignore_errors=True)  # a run interrupted before its JSON was written starts again from nothing
    spec = dict(METHODS[method])
    algorithm = spec.pop("algorithm", "grpo")
    settings = {**cfg.trainer, "output_dir": str(out), "seed": seed, "save_steps": 0}
    args = PreftPPOConfig(**ppo_from_grpo(settings)) if algorithm == "ppo" else PreftGRPOConfig(**settings)
    preft = PreftConfig(**spec)
    start = time.perf_counter()
    rewards = list(TASK_REWARDS.get(task, DEFAULT_REWARDS))
    trainer_class = PreftPPOTrainer if algorithm == "ppo" else PreftGRPOTrainer
    trainer = trainer_class(cfg.model, rewards, args=args, train_dataset=train, preft_config=preft)
    protocol = [gsm8k_accuracy_reward, format_reward, gsm8k_last_number_reward]
    try:
        before = _scores_before_training(cfg, task, trainer, protocol, held_out)
        trainer.train()
        after = trainer.evaluation_scores(protocol, held_out)
    finally:
        trainer.close()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in log if "reward" in r]
    return {
        "task": task, "method": method, "seed": seed, "before": before, "after": after,
        "rewards": rewards,
        "curve": [{"step": r["step"], "reward": r["reward"], **{name: r[f"rewards/{name}/mean"] for name in rewards}} for r in train_rows],
        "seconds_per_step": statistics.fmean(r["time/step"] for r in train_rows),
        "rollout_tokens_per_s": statistics.fmean(r["rollout/tokens_per_s"] for r in train_rows),
        "wall_s": time.perf_counter() - start,
    }


def _scores_before_training(cfg: StudyConfig, task: str, trainer: Any, protocol: list, held_out: Any) -> dict[str, list]:
    """Held-out scores of the untrained adapter. Every method starts as an exact no-op (LoRA B = 0, LoReFT W = R,
    DiReFT W2 = 0), so before training each run scores what the base model scores: computed once per task and
    settings, kept in runs/<task>-before.json, and reused by every run whose adapter is checked to be the identity
    (saves one 200-problem evaluation, ~3-4 min on 2 CPU cores, per run)."""
    from preft_rl.trainers.runtime import gathered

    with gathered(trainer._policy_parameters(), trainer.accelerator):
        identity = trainer.preft_model.is_identity()
    if not identity:
        return trainer.evaluation_scores(protocol, held_out)
    key = {"task": task, "model": cfg.model, "eval_problems": cfg.eval_problems, "data": cfg.data, "trainer": cfg.trainer}
    path = Path(cfg.out) / "runs" / f"{task}-before.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            return saved["scores"]
    scores = trainer.evaluation_scores(protocol, held_out)
    if trainer.accelerator.is_main_process:
        _write_whole(path, {"key": key, "scores": scores})
    return scores


def _write_whole(path: str | Path, data: Any) -> None:
    """Write `data` as JSON to `path` so that the file appears whole or not at all (a crash leaves no half file)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _datasets(cfg: StudyConfig, task: str, seed: int):
    if task == "gsm8k":
        from preft_rl.data import load_gsm8k

        source = cfg.data or (SHARED_GSM8K if SHARED_GSM8K.is_dir() else "auto")
        return (load_gsm8k("train", source=source, shuffle=True, seed=seed),
                load_gsm8k("test", source=source, num_examples=cfg.eval_problems))
    from preft_rl.data import load_generated_task

    # the held-out problems are the same for every seed and method: only the training order changes
    held_out = load_generated_task(task, "test", cfg.eval_problems, seed=0)
    return load_generated_task(task, "train", cfg.train_problems, seed=seed, exclude=held_out["question"]), held_out


# ------------------------------------------------------------------------------------------ all runs
def run(cfg: StudyConfig, verbose: bool = False) -> dict[str, Any]:
    """Every (task, method, seed) in a child process, skipping finished ones; then the summary."""
    runs_dir = Path(cfg.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "study_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    todo = [(t, m, s) for t in cfg.tasks for s in cfg.seeds for m in cfg.methods]
    for i, (task, method, seed) in enumerate(todo, 1):
        path = runs_dir / f"{run_name(task, method, seed)}.json"
        if path.is_file():
            print(f"[{i}/{len(todo)}] {path.name}: done before, kept", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {run_name(task, method, seed)} ...", flush=True)
        command = [sys.executable, "-m", "preft_rl.reports.study", "--run-one", json.dumps([asdict(cfg), task, method, seed, str(path)])]
        if verbose:
            command.append("--verbose")
        done = subprocess.run(command)
        if done.returncode != 0:
            raise RuntimeError(f"study run {run_name(task, method, seed)} failed (exit {done.returncode}); "
                               f"rerun the same command to retry it (finished runs are kept)")
    results = [json.loads((runs_dir / f"{run_name(t, m, s)}.json").read_text()) for t, m, s in todo]
    return summarise(cfg, results)


def summarise(cfg: StudyConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    from .stats import paired_bootstrap

    summary: dict[str, Any] = {"config": asdict(cfg), "tasks": {}}
    for task in cfg.tasks:
        rows = {}
        for method in cfg.methods:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
            for label, key in METRICS.items():
                before = [v for r in runs for v in r["before"][key]]
                after = [v for r in runs for v in r["after"][key]]
                entry[label] = paired_bootstrap(before, after).to_dict()
                entry[label]["per_seed_change"] = [paired_bootstrap(r["before"][key], r["after"][key]).change for r in runs]
            entry["seconds_per_step"] = statistics.fmean(r["seconds_per_step"] for r in runs)
            entry["rollout_tokens_per_s"] = statistics.fmean(r["rollout_tokens_per_s"] for r in runs)
            entry["curves"] = [r["curve"] for r in runs]
            rows[method] = entry
        ratio = None
        if "all-lora" in rows and "preft-lora" in rows and rows["all-lora"]["strict accuracy"]["change"] != 0:
            ratio = rows["preft-lora"]["strict accuracy"]["change"] / rows["all-lora"]["strict accuracy"]["change"]
        summary["tasks"][task] = {"methods": rows, "preft_lora_gain_over_all_token_gain": ratio}
    write_summary(cfg, summary)
    return summary


def write_summary(cfg: StudyConfig, summary: dict[str, Any]) -> None:
    out = Path(cfg.out)
    (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# PreFT vs all-token adapters under GRPO", "",
             f"Model {cfg.model}; seeds {cfg.seeds}; {cfg.eval_problems} held-out problems, greedy; trainer settings: "
             f"`{json.dumps(cfg.trainer, sort_keys=True)}`.", ""]
    for task, data in summary["tasks"].items():
        lines += [f"## {task}", "", "| method | " + " | ".join(f"{m}: before -> after, change [95% CI]" for m in METRICS)
                  + " | s/step | rollout tok/s |", "| --- " * (len(METRICS) + 3) + "|"]
        for method, e in data["methods"].items():
            cells = [f"{c['before']:.3f} -> {c['after']:.3f}, {c['change']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
                     for c in (e[m] for m in METRICS)]
            lines.append(f"| {method} | {' | '.join(cells)} | {e['seconds_per_step']:.1f} | {e['rollout_tokens_per_s']:.0f} |")
        ratio = data["preft_lora_gain_over_all_token_gain"]
        lines += ["", f"PreFT LoRA's strict-accuracy gain / all-token LoRA's: {'n/a' if ratio is None else f'{ratio:.2f}'}", "",
                  f"![learning curves](learning-{task}.png)", ""]
        _curves_plot(out / f"learning-{task}.png", task, data["methods"])
    (out / "study.md").write_text("\n".join(lines))


def _curves_plot(path: Path, task: str, methods: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, e in methods.items():
        curves = [c for c in e["curves"] if c]
        steps = [p["step"] for p in curves[0]]
        per_step = [[c[i]["reward"] for c in curves if i < len(c)] for i in range(len(steps))]
        mean = [statistics.fmean(v) for v in per_step]
        ax.plot(steps, mean, label=f"{method} (mean of {len(curves)} seeds)")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)
    ax.set(title=f"{task}: training reward (band: min-max over seeds)", xlabel="step", ylabel="reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _child(argv: list[str]) -> int:
    """Entry of one run's child process: `python -m preft_rl.reports.study --run-one JSON [--verbose]`."""
    from preft_rl.console import quiet_libraries

    quiet_libraries(verbose="--verbose" in argv)
    cfg_dict, task, method, seed, path = json.loads(argv[argv.index("--run-one") + 1])
    result = run_one(StudyConfig(**cfg_dict), task, method, seed)
    _write_whole(path, result)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
