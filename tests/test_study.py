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


class _Trainer:
    """What the study's before-training scores read of a trainer: the adapter, the accelerator and an evaluation."""

    def __init__(self, identity: bool, score: float) -> None:
        from types import SimpleNamespace

        self.preft_model = SimpleNamespace(is_identity=lambda: identity)
        self.accelerator = SimpleNamespace(state=SimpleNamespace(), is_main_process=True)
        self.score, self.evaluations = score, 0

    def _policy_parameters(self) -> list:
        return []

    def evaluation_scores(self, protocol, held_out) -> dict:
        self.evaluations += 1
        return {"format_reward": [self.score, 0.0]}


def test_the_untrained_adapters_scores_are_computed_once_per_task_and_settings(tmp_path):
    """Every identity adapter of a task reuses the first one's scores; a non-identity adapter, another task or
    other settings are evaluated afresh."""
    from preft_rl.reports.study import StudyConfig, _scores_before_training

    cfg = StudyConfig(out=str(tmp_path), tasks=["chain_sum"])
    (tmp_path / "runs").mkdir()
    first = _Trainer(identity=True, score=1.0)
    assert _scores_before_training(cfg, "chain_sum", first, [], None) == {"format_reward": [1.0, 0.0]}
    again = _Trainer(identity=True, score=0.5)
    assert _scores_before_training(cfg, "chain_sum", again, [], None) == {"format_reward": [1.0, 0.0]} and again.evaluations == 0
    changed = _Trainer(identity=False, score=0.25)
    assert _scores_before_training(cfg, "chain_sum", changed, [], None)["format_reward"][0] == 0.25
    other_task = _Trainer(identity=True, score=0.75)
    assert _scores_before_training(cfg, "gsm8k", other_task, [], None)["format_reward"][0] == 0.75
    cfg.trainer = {**cfg.trainer, "max_completion_length": 7}
    other_settings = _Trainer(identity=True, score=0.125)
    assert _scores_before_training(cfg, "chain_sum", other_settings, [], None)["format_reward"][0] == 0.125
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["chain_sum-before.json", "gsm8k-before.json"]


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
    # every method starts as the identity: one evaluation before training, shared by all 6 runs
    cached = json.loads((out / "runs" / "chain_sum-before.json").read_text())["scores"]
    for path in (out / "runs").glob("chain_sum-*-s*.json"):
        assert json.loads(path.read_text())["before"] == cached, path.name
    # a rerun keeps the finished runs instead of training them again
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, kept") == 6
