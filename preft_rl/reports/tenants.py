"""Multi-tenant benchmark: tenant-steps per hour of one multi-tenant run against sequential single-tenant runs.

    preft-rl bench tenants --tenants 1,4,16 --steps 2 --out docs/benchmarks/tenants-cpu

Every tenant does the same work per step (--prompts-per-tenant prompts x --num-generations completions of up to
--max-completion-length tokens; chain_sum problems under a neutral prompt; reward style_terse; the multi-tenant runs
put --tenants-per-forward tenants' rows through each training forward and backward). Systems, each run in
its own child process (a clean peak-memory reading):
  sequential  one single-tenant run (PreftGRPOTrainer without tenants=); N users today run it N times, one after
              another, so N sequential runs cost N x this run (start-up and every step): measured first and again
              last (a machine that slows down or speeds up during the benchmark moves both), pooled, multiplied
  preft       one multi-tenant run with N tenants, PreFT LoRA (adapters on prompt tokens only)
  all-token   the same multi-tenant run with adapter_scope="all" (every tenant's LoRA on every token)
Each run trains --warmup-steps untimed steps, then --steps timed ones; medians over the timed steps. Reported per N:
tenant-steps per hour in steady state (N / step time) and for a run of --run-steps steps including the measured
start-up (model load, engine start), rollout / forward / backward seconds per tenant, and the peak resident memory
with its slope per extra tenant against the adapter + gradient + AdamW bytes of one tenant.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import check_at_least, start_report

SYSTEMS = ("sequential", "preft", "all-token")
PROMPT = "You are a helpful assistant."


@dataclass
class TenantBenchConfig:
    model: str = "smollm2-135m-instruct"
    tenants: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    steps: int = 2  # timed steps per run
    warmup_steps: int = 1  # untimed steps first (first allocations, first vLLM batches)
    prompts_per_tenant: int = 1
    num_generations: int = 4
    max_completion_length: int = 32
    rank: int = 16
    tenants_per_forward: int = 4  # the multi-tenant runs' tenants_per_forward (0: every tenant's rows in one forward)
    tenants_per_step: int = 0  # the multi-tenant runs' tenants_per_step, round robin (0: every tenant every step)
    tenant_offload: str = "none"  # the multi-tenant runs' tenant_offload: none, cpu or disk
    learning_rate: float = 1e-4
    run_steps: int = 100  # the run length the start-up is spread over in the "with start-up" numbers
    cpu_kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE (CPU only)
    seed: int = 0
    out: str = "outputs/bench-tenants"

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ValueError(f"--systems {self.systems}: choose from {', '.join(SYSTEMS)}")
        if not self.tenants or any(n < 1 for n in self.tenants):
            raise ValueError(f"--tenants {self.tenants}: give tenant counts >= 1, e.g. 1,4,16,64")
        check_at_least(self, 1, ("steps", "prompts_per_tenant", "max_completion_length", "rank", "run_steps", "cpu_kv_cache_gib"))
        check_at_least(self, 0, ("warmup_steps", "tenants_per_forward", "tenants_per_step"))
        if self.tenant_offload not in ("none", "cpu", "disk"):
            raise ValueError(f"--tenant-offload {self.tenant_offload}: use none, cpu or disk")
        if self.num_generations < 2:
            raise ValueError(f"--num-generations {self.num_generations}: GRPO needs at least 2 completions per prompt")


# ------------------------------------------------------------------------------------------ one run (child process)
def run_one(cfg: TenantBenchConfig, system: str, count: int, output_dir: str) -> dict[str, Any]:
    """Build the trainer (timed: the start-up), train warm-up + timed steps, read the per-step phase times."""
    from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, Tenant
    from preft_rl.data import load_generated_task
    from preft_rl.trainers.runtime import peak_rss_gib

    start = time.perf_counter()
    rows = load_generated_task("chain_sum", "train", num_examples=max(64, (cfg.warmup_steps + cfg.steps) * cfg.prompts_per_tenant),
                               seed=cfg.seed, system_prompt=PROMPT)
    args = PreftGRPOConfig(
        output_dir=output_dir, max_steps=cfg.warmup_steps + cfg.steps, num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.prompts_per_tenant * cfg.num_generations, max_completion_length=cfg.max_completion_length,
        max_prompt_length=128, learning_rate=cfg.learning_rate, temperature=1.0, seed=cfg.seed, save_steps=0, logging_steps=1,
        disable_tqdm=True, report_to="none", tenants_per_forward=cfg.tenants_per_forward or None,
        tenants_per_step=cfg.tenants_per_step or None, tenant_offload=None if cfg.tenant_offload == "none" else cfg.tenant_offload,
        engine_kwargs={"max_num_seqs": max(8, _per_step(cfg, count) * cfg.prompts_per_tenant * cfg.num_generations)},
    )
    preft = PreftConfig(method="lora", r=cfg.rank, adapter_scope="all" if system == "all-token" else "prompt")
    if system == "sequential":
        trainer = PreftGRPOTrainer(cfg.model, "style_terse", args=args, train_dataset=rows, preft_config=preft)
    else:
        tenants = [Tenant(f"t{i}", rows, "style_terse") for i in range(count)]
        trainer = PreftGRPOTrainer(cfg.model, args=args, tenants=tenants, preft_config=preft)
    start_s = time.perf_counter() - start
    rows_in_model = len(getattr(trainer.preft_model, "tenant_names", [None]))
    adapter_params = sum(p.numel() for _, p in trainer.preft_model.adapter_named_parameters()) // rows_in_model
    try:
        trainer.train()
        offload = {}
        if getattr(trainer, "_rows", None) is not None:  # what waits outside the model: bytes, and tenants with an entry
            store = trainer._rows.store
            offload = {"store_bytes": store.nbytes(), "stored_tenants": len(store.names()), "tenant_loads": trainer._rows.loads}
    finally:
        trainer.close()
    log = [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"step": r["step"], "step_s": r["time/step"], "completion_tokens": r["completions/mean_length"],
              **{key.split("/")[1] + "_s": value for key, value in r.items() if key.startswith("time/") and key != "time/step"}}
             for r in log if "reward" in r and r["step"] > cfg.warmup_steps]
    return {"system": system, "tenants": count, "start_s": start_s, "steps": steps, "peak_rss_gib": peak_rss_gib(),
            "adapter_params": adapter_params * count, **offload}


def _per_step(cfg: TenantBenchConfig, count: int) -> int:
    """Tenants a multi-tenant run with `count` tenants trains per step."""
    return min(cfg.tenants_per_step or count, count)


def _child(argv: list[str]) -> int:
    """Entry of one run's child process: `python -m preft_rl.reports.tenants --run-one JSON`."""
    from preft_rl.console import quiet_libraries

    quiet_libraries("--verbose" in argv)
    cfg_dict, system, count, path = json.loads(argv[argv.index("--run-one") + 1])
    with tempfile.TemporaryDirectory(prefix=f"bench-tenants-{system}-{count}-") as tmp:
        result = run_one(TenantBenchConfig(**cfg_dict), system, count, tmp)
    Path(path).write_text(json.dumps(result) + "\n")
    return 0


# ------------------------------------------------------------------------------------------ all runs
def run(cfg: TenantBenchConfig, verbose: bool = False) -> dict[str, Any]:
    """The sequential baseline once, then each tenant count with each multi-tenant system, each run a child process."""
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_cache_gib), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    _read_model_files(cfg.model)  # the first run must not pay for a cold file cache that the others do not
    plan = [("sequential", 1)] if "sequential" in cfg.systems else []
    plan += [(system, n) for n in cfg.tenants for system in cfg.systems if system != "sequential"]
    if "sequential" in cfg.systems and len(plan) > 1:
        plan.append(("sequential", 1))
    runs, failures = [], []
    for i, (system, count) in enumerate(plan):
        path = out / "runs" / (f"{system}-{count}" + ("-last" if i and i == len(plan) - 1 and system == "sequential" else "") + ".json")
        print(f"[{i + 1}/{len(plan)}] {system}, {count} tenant(s) ...", flush=True)
        command = [sys.executable, "-m", "preft_rl.reports.tenants", "--run-one", json.dumps([asdict(cfg), system, count, str(path)])]
        if verbose:
            command.append("--verbose")
        done = subprocess.run(command, env=env)
        if done.returncode != 0:  # recorded, and the other runs go on: a large N may not fit this machine
            why = f"exit {done.returncode}" + (" (killed: most likely out of memory)" if done.returncode in (-9, 137) else "")
            failures.append({"system": system, "tenants": count, "failed": why})
            print(f"[{i + 1}/{len(plan)}] {system}, {count} tenant(s): FAILED, {why}; rerun with --verbose to see why", flush=True)
            continue
        result = json.loads(path.read_text())
        runs.append(result)
        print(f"[{i + 1}/{len(plan)}] {system}, {count} tenant(s): start-up {result['start_s']:.1f} s, "
              f"{statistics.median(s['step_s'] for s in result['steps']):.2f} s/step", flush=True)
    if not runs:
        raise RuntimeError("bench tenants: every run failed; rerun with --verbose to see why")
    return {"config": asdict(cfg), "runs": runs, "failures": failures, "summary": summarize(cfg, runs)}


def _read_model_files(model: str) -> None:
    from preft_rl.models import resolve_model

    path = Path(resolve_model(model))
    for file in path.rglob("*") if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def _median(steps: list[dict], key: str) -> float | None:
    values = [s[key] for s in steps if s.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(cfg: TenantBenchConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (system, N): tenant-steps per hour (steady, and with start-up over run_steps), per-tenant phase seconds,
    speed-ups against sequential runs and PreFT's rollout against all-token's; the memory slope per tenant."""
    def row_of(run: dict, count: int, scale: int = 1) -> dict[str, Any]:
        trained = _per_step(cfg, count)  # tenants per step (sequential: N runs, one after another, each one tenant)
        scale = min(scale, trained)
        step_s = _median(run["steps"], "step_s") * scale
        start_s = run["start_s"] * scale
        steps = cfg.run_steps
        return {"system": run["system"], "tenants": count, "step_s": step_s, "start_s": start_s,
                "tenant_steps_per_hour": trained * 3600 / step_s,
                "tenant_steps_per_hour_with_start": trained * steps * 3600 / (start_s + steps * step_s),
                **{f"{phase}_per_tenant_s": (_median(run["steps"], f"{phase}_s") or 0.0) * scale / trained
                   for phase in ("generate", "forward", "backward", "logprobs", "tenant_moves")},
                **{key: run[key] for key in ("store_bytes", "stored_tenants", "tenant_loads") if key in run},
                "completion_tokens": _median(run["steps"], "completion_tokens"),
                "peak_rss_gib": None if scale > 1 else run["peak_rss_gib"], "adapter_params": run["adapter_params"] // max(count, 1)}

    sequential = [r for r in runs if r["system"] == "sequential"]
    single = None if not sequential else {  # its runs pooled: every timed step, the mean start-up
        **sequential[0], "steps": [s for r in sequential for s in r["steps"]],
        "start_s": statistics.mean(r["start_s"] for r in sequential), "peak_rss_gib": max(r["peak_rss_gib"] for r in sequential)}
    rows = []
    measured = {r["tenants"] for r in runs if r["system"] != "sequential"}  # a failed run's tenant count has no row
    for count in [n for n in cfg.tenants if n in measured] if measured else cfg.tenants:
        if single is not None:
            rows.append(row_of(single, count, scale=count))
        rows += [row_of(r, count) for r in runs if r["system"] != "sequential" and r["tenants"] == count]
    for row in rows:
        same = {r["system"]: r for r in rows if r["tenants"] == row["tenants"]}
        seq, all_token = same.get("sequential"), same.get("all-token")
        row["vs_sequential"] = row["tenant_steps_per_hour"] / seq["tenant_steps_per_hour"] if seq else None
        row["vs_sequential_with_start"] = (row["tenant_steps_per_hour_with_start"] / seq["tenant_steps_per_hour_with_start"]
                                           if seq else None)
        row["rollout_vs_all_token"] = (all_token["generate_per_tenant_s"] / row["generate_per_tenant_s"]
                                       if all_token and row["generate_per_tenant_s"] else None)
    memory = {}
    for system in ("preft", "all-token"):
        points = [(r["tenants"], r["peak_rss_gib"]) for r in runs if r["system"] == system and r["peak_rss_gib"] is not None]
        if len(points) >= 2:
            memory[system] = _slope(points) * 1024  # MiB per extra tenant
    params = next((r["adapter_params"] // r["tenants"] for r in runs if r["system"] == "preft"), None)
    # one tenant's adapter, its gradient and AdamW's two moments, fp32
    return {"rows": rows, "memory_mib_per_tenant": memory,
            "expected_mib_per_tenant": None if params is None else params * 4 * 4 / 2**20}


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def write_report(result: dict[str, Any], out: str | Path, command: str, predictions: list[str] | None = None) -> dict[str, Path]:
    """tenants.json (everything) and tenants.md (the table) in `out`."""
    paths = start_report(out, "tenants", result, command)
    cfg, summary = result["config"], result["summary"]
    fmt = lambda v, spec=".2f": "" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# Multi-tenant GRPO: tenant-steps per hour", "", f"Command: `{command}`", "",
        f"Per tenant and step: {cfg['prompts_per_tenant']} prompt(s) x {cfg['num_generations']} completions of up to "
        f"{cfg['max_completion_length']} tokens, LoRA r={cfg['rank']} on every linear layer, fp32; "
        f"{cfg.get('tenants_per_forward') or 'all'} tenants' rows per training forward; {cfg['warmup_steps']} warm-up + "
        f"{cfg['steps']} timed steps per run, medians. 'sequential' is one single-tenant run x N. 'with start-up': a "
        f"{cfg['run_steps']}-step run, the measured start-up included.", "",
        "| tenants | system | tenant-steps/h | vs sequential | with start-up: tenant-steps/h | vs sequential | s/step "
        "| rollout s/tenant | PreFT rollout vs all-token | forward s/tenant | backward s/tenant | start-up s | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['tenants']} | {r['system']} | {r['tenant_steps_per_hour']:.0f} | {fmt(r['vs_sequential'])} | "
            f"{r['tenant_steps_per_hour_with_start']:.0f} | {fmt(r['vs_sequential_with_start'])} | {r['step_s']:.1f} | "
            f"{r['generate_per_tenant_s']:.2f} | {fmt(r['rollout_vs_all_token'] if r['system'] == 'preft' else None)} | "
            f"{r['forward_per_tenant_s']:.2f} | {r['backward_per_tenant_s']:.2f} | {r['start_s']:.0f} | {fmt(r['peak_rss_gib'], '.2f')} |")
    if summary["memory_mib_per_tenant"]:
        expected = summary["expected_mib_per_tenant"]
        lines += ["", "Peak resident memory per extra tenant (least-squares slope over the tenant counts): "
                  + ", ".join(f"{s} {v:.1f} MiB" for s, v in summary["memory_mib_per_tenant"].items())
                  + (f"; one tenant's adapter + gradient + AdamW moments (fp32): {expected:.1f} MiB." if expected else ".")]
    stored = [r for r in summary["rows"] if r.get("stored_tenants")]
    if stored:
        lines += ["", "Tenants waiting outside the model (tenant_offload=" + str(cfg.get("tenant_offload")) + "): "
                  + "; ".join(f"{r['tenants']} tenants: {r['stored_tenants']} with an entry, {r['store_bytes'] / 2**20:.0f} MiB "
                              f"({r['store_bytes'] / r['stored_tenants'] / 2**20:.2f} MiB each), {r['tenant_loads']} brought in, "
                              f"moves {r['tenant_moves_per_tenant_s'] * min(cfg['tenants_per_step'] or r['tenants'], r['tenants']):.2f} s/step"
                              for r in stored) + "."]
    for failure in result.get("failures", []):
        lines += ["", f"**{failure['system']} with {failure['tenants']} tenants did not finish: {failure['failed']}.**"]
    if predictions:
        lines += ["", "## Predictions (written before the run)", "", *predictions]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths


if __name__ == "__main__":
    sys.exit(_child(sys.argv))
