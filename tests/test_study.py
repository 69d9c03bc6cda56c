"""`preft-rl study` end to end on the tiny Llama, and the generated-task loader it uses."""

from __future__ import annotations

import json

import pytest

from preft_rl.data import load_generated_task
from preft_rl.rewards import gsm8k_accuracy_reward


def test_generated_task_rows_score_with_the_gsm8k_rewards():
    test = load_generated_task("chain_sum", "test", 200, seed=0)
    unfiltered = load_generated_task("chain_sum", "train", 200, seed=0)
    assert set(unfiltered["question"]) & set(test["question"])  # the problem space is small: splits overlap by chance
    train = load_generated_task("chain_sum", "train", 200, seed=0, exclude=test["question"])
    assert set(train.column_names) == {"prompt", "answer", "question"}
    assert not set(train["question"]) & set(test["question"]) and len(train) > 150
    train = train.select(range(20))
    gold = [a.removeprefix("#### ") for a in train["answer"]]
    rewards = gsm8k_accuracy_reward(train["prompt"], [f"so\n#### {g}" for g in gold], answer=train["answer"])
    assert rewards == [1.0] * 20
    assert load_generated_task("chain_sum", "train", 5, seed=3)["question"] == load_generated_task("chain_sum", "train", 5, seed=3)["question"]
    with pytest.raises(ValueError, match="'sudoku' is not one of the numeric reasoning-gym tasks"):
        load_generated_task("sudoku")


def test_study_config_names_bad_values():
    from preft_rl.reports.study import StudyConfig

    with pytest.raises(ValueError, match=r"unknown methods \['lora'\]"):
        StudyConfig(methods=["lora"])
    with pytest.raises(ValueError, match=r"unknown tasks \['math'\]"):
        StudyConfig(tasks=["math"])


@pytest.mark.slow
def test_study_runs_end_to_end_on_the_tiny_model(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("vllm")
    from preft_rl.cli import main

    out = tmp_path / "study"
    argv = ["study", "--model", str(tiny_llama_dir), "--tasks", "chain_sum", "--seeds", "0,1", "--max-steps", "2",
            "--eval-problems", "6", "--train-problems", "16", "--max-completion-length", "6", "--max-prompt-length", "200",
            "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "study.json").read_text())
    methods = summary["tasks"]["chain_sum"]["methods"]
    assert set(methods) == {"preft-lora", "preft-loreft", "all-lora"}
    for entry in methods.values():
        assert entry["seeds"] == [0, 1]
        assert [len(c) for c in entry["curves"]] == [2, 2]
        strict = entry["strict accuracy"]
        assert strict["num_items"] == 12 and strict["low"] <= strict["change"] <= strict["high"]
        assert entry["seconds_per_step"] > 0 and entry["rollout_tokens_per_s"] > 0
    assert (out / "learning-chain_sum.png").stat().st_size > 0
    assert "| all-lora |" in (out / "study.md").read_text()
    # a rerun keeps the finished runs instead of training them again
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, kept") == 6
