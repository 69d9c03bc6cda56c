"""The two main jobs end to end on the tiny Llama: one short step each, held-out evaluation before and after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("example", ["grpo_gsm8k.py", "ppo_gsm8k.py"])
def test_example_trains_and_reports_the_held_out_change(tiny_llama_dir, tmp_path, example):
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "examples" / example), "--model", str(tiny_llama_dir), "--output-dir", str(out),
               "--max-steps", "2", "--eval-problems", "4", "--max-completion-length", "8", "--max-prompt-length", "256",
               "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "1", "--num-generations", "2",
               "--disable-tqdm"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "strict accuracy" in done.stdout and "format rate" in done.stdout
    heldout = json.loads((out / "heldout.json").read_text())
    assert set(heldout["metrics"]) == {"strict accuracy", "format rate", "lenient accuracy"}
    assert len((out / "heldout_completions.jsonl").read_text().splitlines()) == 4
    assert (out / "adapter_model.safetensors").is_file() and (out / "report.md").is_file()
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    if example == "ppo_gsm8k.py":
        assert (out / "checkpoint-2" / "trained_state.safetensors").is_file()  # the critic is saved with the run


@pytest.mark.slow
def test_multitenant_example_reads_a_yaml_tenants_file_and_reports_each_tenant(tiny_llama_dir, tmp_path):
    """examples/grpo_multitenant.py with the YAML tenants file, where heidi trains on her recorded traffic (a `traffic`
    folder, with eval_data held out): every tenant's adapter is a normal adapter folder, and each tenant's held-out
    metric is reported before and after with a 95% interval."""
    import yaml

    from test_traffic_training import recorded_store

    recorded_store(tiny_llama_dir, tmp_path / "traffic", {"heidi": 0.0}).close()
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"question": f"what is {i} + 3?"}) + "\n" for i in range(3)))
    tenants = yaml.safe_load((REPO / "examples" / "tenants" / "styles.yaml").read_text())["tenants"]
    tenants[-1] = {**{k: v for k, v in tenants[-1].items() if k != "data"}, "traffic": "traffic", "eval_data": "held.jsonl"}
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "examples" / "grpo_multitenant.py"), "--model", str(tiny_llama_dir),
               "--tenants-file", str(tmp_path / "tenants.yaml"), "--output-dir", str(out),
               "--max-steps", "1", "--eval-problems", "3", "--max-completion-length", "6", "--per-device-train-batch-size", "2",
               "--gradient-accumulation-steps", "1", "--num-generations", "2", "--disable-tqdm"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    heldout = json.loads((out / "heldout.json").read_text())["tenants"]
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    assert list(heldout) == names
    for name in names:
        assert {"before", "after", "change", "low", "high", "num_items"} <= set(heldout[name]) and heldout[name]["num_items"] == 3
        assert (out / "tenants" / name / "adapter_model.safetensors").is_file()
        assert (out / "tenants" / name / "adapter_config.json").is_file()
        assert f"| {name} |" in done.stdout
    assert "The same held-out question, answered by each tenant's adapter" in done.stdout
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert log["tenants/heidi/traffic/rows"] >= 1 and "tenants/alice/traffic/rows" not in log
    assert "preft-rl serve" in done.stdout and f"alice={out / 'tenants' / 'alice'}" in done.stdout


@pytest.mark.slow
def test_tools_example_trains_with_the_calculator_and_reports_tool_use(tiny_llama_dir, tmp_path):
    """examples/grpo_tools.py end to end on the tiny Llama (too small to write a tool call: the multi-turn path with
    tools is exercised by tests/test_tools.py), then its calculator alone."""
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "examples" / "grpo_tools.py"), "--model", str(tiny_llama_dir), "--output-dir",
               str(out), "--max-steps", "2", "--eval-problems", "4", "--train-problems", "20", "--max-completion-length", "48",
               "--per-device-train-batch-size", "4", "--num-generations", "2", "--disable-tqdm"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    heldout = json.loads((out / "heldout.json").read_text())
    assert set(heldout["metrics"]) == {"strict accuracy", "format rate", "tool-call rate"}
    assert "the calculate tool" in heldout["protocol"]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2] and all("tools/calls" in entry for entry in logs)
    assert (out / "adapter_model.safetensors").is_file()

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from grpo_tools import calculate
    finally:
        sys.path.remove(str(REPO / "examples"))
    assert calculate("812 - 57 + 39") == "794" and calculate("3 / 4") == "0.75" and calculate("-(2 * 3)") == "-6"
    for bad in ("__import__('os').system('true')", "2 ** 99999", "x + 1"):
        with pytest.raises((ValueError, SyntaxError)):
            calculate(bad)


@pytest.mark.slow
def test_online_example_serves_trains_pushes_and_reports_both_arms(tiny_llama_dir, tmp_path):
    """examples/online_personalisation.py on the tiny Llama for a minute: the server answers every user, the loop
    trains and pushes at least one round (a treated adapter's version goes up), and the report has both arms."""
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "examples" / "online_personalisation.py"), "--model", str(tiny_llama_dir),
               "--minutes", "1.5", "--think-s", "0.5", "--min-new", "4", "--max-tokens", "6", "--windows", "2",
               "--out", str(out), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "online.json").read_text())
    assert result["requests"] > 16 and result["errors"] == 0 and result["feedback_ok"] == result["requests"]
    assert result["pushes"], (tmp_path / "work" / "online.log").read_text()[-3000:]  # a treated adapter changed version
    assert {r["arm"] for r in result["rows"]} == {"treated", "control"}
    assert (out / "online.png").is_file() and "| 0.0-0.8 |" in (out / "online.md").read_text()
