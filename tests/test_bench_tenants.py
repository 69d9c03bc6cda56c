"""`preft-rl bench tenants` end to end on the tiny Llama: every system runs, the table and the ratios are filled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from preft_rl.reports.tenants import TenantBenchConfig, summarize

pytest.importorskip("vllm")
REPO = Path(__file__).resolve().parents[1]


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--systems"):
        TenantBenchConfig(systems=["parallel"])
    with pytest.raises(ValueError, match="--tenants"):
        TenantBenchConfig(tenants=[0])
    with pytest.raises(ValueError, match="--num-generations 1"):
        TenantBenchConfig(num_generations=1)
    with pytest.raises(ValueError, match="--tenants-per-forward -1"):
        TenantBenchConfig(tenants_per_forward=-1)


def test_summary_scales_the_sequential_run_and_fits_the_memory_slope():
    cfg = TenantBenchConfig(tenants=[1, 4], run_steps=10)
    step = lambda s, g: [{"step": 2, "step_s": s, "generate_s": g, "forward_s": 1.0, "backward_s": 1.0}]  # noqa: E731
    runs = [{"system": "sequential", "tenants": 1, "start_s": 20.0, "steps": step(4.0, 2.0), "peak_rss_gib": 2.0, "adapter_params": 1000},
            {"system": "sequential", "tenants": 1, "start_s": 22.0, "steps": step(4.0, 2.0), "peak_rss_gib": 2.0, "adapter_params": 1000},
            {"system": "preft", "tenants": 1, "start_s": 20.0, "steps": step(4.0, 2.0), "peak_rss_gib": 2.0, "adapter_params": 1000},
            {"system": "preft", "tenants": 4, "start_s": 21.0, "steps": step(8.0, 2.0), "peak_rss_gib": 2.3, "adapter_params": 4000},
            {"system": "all-token", "tenants": 4, "start_s": 21.0, "steps": step(16.0, 8.0), "peak_rss_gib": 2.3, "adapter_params": 4000}]
    summary = summarize(cfg, runs)
    rows = {(r["system"], r["tenants"]): r for r in summary["rows"]}
    # 4 runs, one after another; the two sequential runs (first and last) pooled: their steps, their mean start-up
    assert rows["sequential", 4]["step_s"] == 16.0 and rows["sequential", 4]["start_s"] == 84.0
    assert rows["preft", 4]["vs_sequential"] == pytest.approx(2.0)  # 4 tenant-steps in 8 s vs in 16 s
    assert rows["preft", 4]["vs_sequential_with_start"] == pytest.approx((84 + 160) / (21 + 80))
    runs[1]["steps"] = step(6.0, 2.0)
    assert {(r["system"], r["tenants"]): r for r in summarize(cfg, runs)["rows"]}["sequential", 1]["step_s"] == 5.0
    assert rows["preft", 4]["rollout_vs_all_token"] == pytest.approx(4.0)
    assert summary["memory_mib_per_tenant"]["preft"] == pytest.approx(0.1 * 1024)
    assert summary["expected_mib_per_tenant"] == pytest.approx(1000 * 16 / 2**20)


@pytest.mark.slow
def test_bench_tenants_runs_every_system_and_writes_the_report(tiny_llama_dir, tmp_path):
    predictions = tmp_path / "predictions.md"
    predictions.write_text("- predicted: more tenants, more tenant-steps per hour\n")
    command = [sys.executable, "-m", "preft_rl.cli", "bench", "tenants", "--model", str(tiny_llama_dir), "--tenants", "1,2",
               "--steps", "1", "--warmup-steps", "0", "--num-generations", "2", "--max-completion-length", "4", "--rank", "4",
               "--tenants-per-forward", "1", "--cpu-kv-cache-gib", "1", "--predictions", str(predictions), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "tenants.json").read_text())
    assert sorted((r["system"], r["tenants"]) for r in result["runs"]) == [("all-token", 1), ("all-token", 2), ("preft", 1),
                                                                           ("preft", 2), ("sequential", 1), ("sequential", 1)]
    rows = result["summary"]["rows"]
    assert len(rows) == 6 and all(r["tenant_steps_per_hour"] > 0 and r["vs_sequential"] > 0 for r in rows)
    assert set(result["summary"]["memory_mib_per_tenant"]) == {"preft", "all-token"}
    report = (tmp_path / "out" / "tenants.md").read_text()
    assert "| 2 | preft |" in report and "predicted: more tenants" in report and "1 tenants' rows per training forward" in report
