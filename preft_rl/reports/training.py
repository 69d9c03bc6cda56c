"""Training report: render a GRPO run's log.jsonl as Markdown plus PNG plots.

    preft-rl report outputs/grpo-gsm8k          # writes report.md, reward.png, throughput.png, timing.png there

When the run also wrote `heldout.json` (see `write_heldout`: held-out scores before and after training with
paired-bootstrap intervals), the report gets a held-out table and accuracy.png.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

HELDOUT_NAME = "heldout.json"
# the step's phases, which do not overlap (time/update is forward + backward + optimizer and more; not stacked)
TIMING_KEYS = ("time/sync", "time/generate", "time/score", "time/logprobs", "time/forward", "time/backward", "time/optimizer")


def read_log(output_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of output_dir/log.jsonl, in step order."""
    path = Path(output_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the output_dir of a PreftGRPOTrainer run")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval/reward" in r]
    if not train:
        raise ValueError(f"{path} holds no training steps yet")
    return train, evals


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[list, list]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _timing_plot(path: Path, train: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(train)
    for key in TIMING_KEYS:
        values = [r.get(key, 0.0) for r in train]
        ax.bar(steps, values, bottom=bottom, label=key.split("/")[1])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(title="Step time breakdown", xlabel="step", ylabel="seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_heldout(output_dir: str | Path, protocol: str, changes: dict[str, Any]) -> Path:
    """Save held-out results: `changes` maps a metric name to a PairedChange (or its dict)."""
    path = Path(output_dir) / HELDOUT_NAME
    rows = {name: (c if isinstance(c, dict) else c.to_dict()) for name, c in changes.items()}
    path.write_text(json.dumps({"protocol": protocol, "metrics": rows}, indent=2) + "\n")
    return path


def heldout_table(heldout: dict[str, Any]) -> list[str]:
    """Markdown rows: metric, before, after, change and its confidence interval."""
    lines = ["| metric | before | after | change | CI of the change |", "| --- | --- | --- | --- | --- |"]
    for name, c in heldout["metrics"].items():
        percent = round(100 * c["confidence"])
        lines.append(f"| {name} | {c['before']:.3f} | {c['after']:.3f} | {c['change']:+.3f} | "
                     f"{percent}% [{c['low']:+.3f}, {c['high']:+.3f}] |")
    return lines


def _heldout_plot(path: Path, heldout: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(heldout["metrics"])
    rows = [heldout["metrics"][n] for n in names]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([x - 0.2 for x in xs], [r["before"] for r in rows], width=0.4, label="before")
    # error bar on "after": the paired interval of the change, placed around the after value
    err = [[r["change"] - r["low"] for r in rows], [r["high"] - r["change"] for r in rows]]
    ax.bar([x + 0.2 for x in xs], [r["after"] for r in rows], width=0.4, yerr=err, capsize=4, label="after (bar: CI of change)")
    ax.set_xticks(list(xs), names)
    ax.set(title="Held-out before and after training", ylabel="mean over problems")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_training_report(output_dir: str | Path) -> Path:
    """Write report.md and three PNG plots into output_dir; returns the Markdown path."""
    out = Path(output_dir)
    train, evals = read_log(out)
    steps = [r["step"] for r in train]
    reward_keys = sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    series = {"reward": (steps, [r["reward"] for r in train])}
    series.update({k.split("/")[1]: (steps, [r.get(k) for r in train]) for k in reward_keys})
    if evals:
        series["eval reward"] = ([r["step"] for r in evals], [r["eval/reward"] for r in evals])
    _plot(out / "reward.png", "Reward and accuracy", "step", "mean over completions", series)
    _plot(out / "throughput.png", "Rollout throughput", "step", "generated tokens / s",
          {"rollout tokens/s": (steps, [r.get("rollout/tokens_per_s", 0.0) for r in train])})
    _timing_plot(out / "timing.png", train)

    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in train)  # noqa: E731
    step_time = mean("time/step") or 1e-9
    lines = [
        f"# Training report: {out.name}",
        "",
        f"{len(train)} logged steps (last step {steps[-1]}).",
        "",
        "| metric | first step | last step | mean |",
        "| --- | --- | --- | --- |",
    ]
    for key in ["reward", *reward_keys, "completions/mean_length", "kl", "entropy", "rollout/tokens_per_s"]:
        if key in train[0]:
            lines.append(f"| {key} | {train[0][key]:.4g} | {train[-1][key]:.4g} | {mean(key):.4g} |")
    if evals:
        lines.append(f"| eval/reward | {evals[0]['eval/reward']:.4g} | {evals[-1]['eval/reward']:.4g} | |")
    lines += ["", "Mean step time breakdown:", "", "| phase | seconds | share |", "| --- | --- | --- |"]
    for key in TIMING_KEYS:
        lines.append(f"| {key.split('/')[1]} | {mean(key):.3f} | {100 * mean(key) / step_time:.1f}% |")
    lines.append(f"| step | {step_time:.3f} | 100% |")
    lines += ["", "![reward](reward.png)", "", "![throughput](throughput.png)", "", "![timing](timing.png)", ""]
    if (out / HELDOUT_NAME).is_file():
        heldout = json.loads((out / HELDOUT_NAME).read_text())
        _heldout_plot(out / "accuracy.png", heldout)
        lines[lines.index("Mean step time breakdown:"):lines.index("Mean step time breakdown:")] = [
            f"Held-out: {heldout['protocol']}", "", *heldout_table(heldout), "", "![held-out](accuracy.png)", "",
        ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
