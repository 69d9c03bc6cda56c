"""Trainer probes from the reliability sweep (issue 14): a non-finite reward or gradient never reaches the
weights or a file, and a corrupt checkpoint is named and refused before any of it is applied.

One real trainer (tiny Llama, fp32, CPU) is shared by the module; each test restores what it changes."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from preft_rl import PreftConfig, PreftGRPOTrainer
from preft_rl.trainers import checkpoint
from preft_rl.trainers import grpo_core as core
from preft_rl.trainers import rollout as rollout_module
from preft_rl.trainers.rollout import score
from test_grpo_trainer import config, dataset, first_token_even

pytest.importorskip("vllm")


# ------------------------------------------------------------------------------------------ rewards
def constant_rewards(values):
    def reward(prompts, completions, completion_ids=None, **_):
        return list(values)

    return reward


def test_a_non_finite_reward_is_refused_with_the_function_and_the_row():
    fn = constant_rewards([1.0, 0.0, math.inf, 0.5])
    with pytest.raises(ValueError, match=r"reward function 'exploding' returned inf for row 2 .*completion 'c2'"):
        score([fn], ["exploding"], ["p"] * 4, ["c0", "c1", "c2", "c3"], [[1]] * 4, {})
    with pytest.raises(ValueError, match=r"returned -inf for row 0"):
        score([constant_rewards([-math.inf, 1.0])], ["minus"], ["p"] * 2, ["a", "b"], [[1]] * 2, {})


def test_a_nan_reward_counts_as_none_is_counted_and_warned_about_once(caplog):
    fn = constant_rewards([1.0, math.nan, math.nan, None])
    counts = rollout_module.reward_nan_counts  # per reward function, over the process's lifetime
    before = counts["nan_reward"]
    with caplog.at_level(logging.WARNING, logger="preft_rl.trainers.rollout"):
        first = score([fn], ["nan_reward"], ["p"] * 4, ["a"] * 4, [[1]] * 4, {})
        second = score([fn], ["nan_reward"], ["p"] * 4, ["a"] * 4, [[1]] * 4, {})
    for out in (first, second):
        assert out[0, 0] == 1.0 and out[1:, 0].isnan().all()
    assert counts["nan_reward"] == before + 4
    warnings = [r.message for r in caplog.records if "nan_reward" in r.message and "NaN" in r.message]
    assert len(warnings) == 1, warnings


# ------------------------------------------------------------------------------------------ trainer
@pytest.fixture(scope="module")
def trainer(tiny_llama_dir, tmp_path_factory):
    args = config(tmp_path_factory.mktemp("reliability-run"), per_device_train_batch_size=4, num_generations=4, max_steps=2,
                  learning_rate=1e-2)
    trainer = PreftGRPOTrainer(str(tiny_llama_dir), first_token_even, args=args, train_dataset=dataset(False, n=8),
                               preft_config=PreftConfig(method="lora", r=4))
    yield trainer
    trainer.close()


def adapter_snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.preft_model.adapter_state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture
def restored(trainer):
    """Undo whatever a test does to the shared trainer's adapter, optimizer, scheduler and output dir."""
    adapter, output_dir = adapter_snapshot(trainer), trainer.args.output_dir
    optimizer, scheduler = copy.deepcopy(trainer.optimizer.state_dict()), copy.deepcopy(trainer.scheduler.state_dict())
    yield trainer
    with torch.no_grad():
        trainer.preft_model.load_adapter_state_dict(adapter)
    trainer.optimizer.load_state_dict(optimizer)
    trainer.scheduler.load_state_dict(scheduler)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.args.output_dir = output_dir
    trainer._engine_in_sync = False


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_non_finite_gradient_skips_the_optimizer_step_and_is_counted(restored, max_grad_norm, monkeypatch):
    trainer = restored
    monkeypatch.setattr(trainer.args, "max_grad_norm", max_grad_norm)
    batch, _ = trainer._generate_and_score(0)
    bad = dataclasses.replace(batch, advantages=batch.advantages.clone())
    bad.advantages[0] = math.inf  # loss and gradients become non-finite
    before, optimizer_before = adapter_snapshot(trainer), copy.deepcopy(trainer.optimizer.state_dict())
    stats = trainer._optimizer_step(bad)
    assert stats["skipped_steps"] >= 1
    skipped = stats["skipped_steps"]
    assert not math.isfinite(stats["grad_norm"])
    assert_same_tensors(before, adapter_snapshot(trainer))  # not stepped
    assert trainer.optimizer.state_dict()["state"].keys() == optimizer_before["state"].keys()
    assert all(p.grad is None for _, p in trainer.preft_model.adapter_named_parameters())  # and nothing carried over
    # the next finite batch steps normally, and the count stays
    stats = trainer._optimizer_step(batch)
    assert stats["skipped_steps"] == skipped and math.isfinite(stats["grad_norm"])
    after = adapter_snapshot(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_an_infinite_reward_stops_the_rollout_before_any_step(restored, monkeypatch):
    trainer = restored
    calls = []

    def sometimes_inf(prompts, completions, completion_ids=None, **_):
        calls.append(len(completions))
        return [math.inf if i == 3 else 0.0 for i in range(len(completions))]

    monkeypatch.setattr(trainer, "reward_funcs", [sometimes_inf])
    monkeypatch.setattr(trainer, "reward_names", ["sometimes_inf"])
    with pytest.raises(ValueError, match="reward function 'sometimes_inf' returned inf for row 3"):
        trainer._generate_and_score(0)
    assert calls


def test_no_checkpoint_or_adapter_file_is_written_with_non_finite_weights(restored, tmp_path):
    trainer = restored
    trainer.args.output_dir = str(tmp_path)
    name, param = next(iter(trainer.preft_model.adapter_named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=rf"{name} has non-finite values.*not written"):
        checkpoint.save(trainer, 7, None)
    assert list(tmp_path.iterdir()) == []  # neither checkpoint-7 nor checkpoint-7.tmp
    with pytest.raises(ValueError, match="non-finite"):
        trainer.save_model(tmp_path / "final")
    assert not (tmp_path / "final" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------- checkpoints
def _corrupt(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "garbage":
        path.write_bytes(b"not a checkpoint file")
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        state = load_file(str(path))
        key = sorted(state)[0]
        state[key][0] = math.nan
        save_file(state, str(path))
    elif how == "wrong-optimizer":
        torch.save({"state": {}, "param_groups": []}, path)


def trainer_state(trainer) -> tuple:
    return (adapter_snapshot(trainer), copy.deepcopy(trainer.optimizer.state_dict()), copy.deepcopy(trainer.scheduler.state_dict()),
            torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy(), trainer.step)


def assert_same_trainer_state(before: tuple, after: tuple) -> None:
    assert_same_tensors(before[0], after[0])
    assert before[1]["state"].keys() == after[1]["state"].keys()
    for key, value in before[1]["state"].items():
        assert_same_tensors(value, after[1]["state"][key])
    assert before[2] == after[2]
    assert torch.equal(before[3], after[3]) and before[4] == after[4] and np.array_equal(before[5], after[5])
    assert before[6] == after[6]


@pytest.mark.parametrize(
    "file,how",
    [("optimizer.pt", "truncate"), ("optimizer.pt", "wrong-optimizer"), ("adapter_model.safetensors", "truncate"),
     ("adapter_model.safetensors", "nan"), ("scheduler.pt", "garbage"), ("rng_state_0.pt", "truncate"),
     ("rollout_0.pt", "truncate"), ("trainer_state.json", "garbage")],
)
def test_a_corrupt_checkpoint_is_named_and_nothing_of_it_is_applied(restored, tmp_path, file, how):
    trainer = restored
    trainer.args.output_dir = str(tmp_path)
    batch, _ = trainer._generate_and_score(0)
    trainer._optimizer_step(batch)
    checkpoint.save(trainer, 1, batch)
    trainer._optimizer_step(batch)
    trainer.args.num_iterations = 2  # so that checkpoint-3 holds a rollout file (mid-way through reusing it)
    try:
        checkpoint.save(trainer, 3, batch)
    finally:
        trainer.args.num_iterations = 1
    newest = tmp_path / "checkpoint-3"
    assert (newest / file).is_file()
    _corrupt(newest / file, how)
    with torch.no_grad():  # a state that differs from both checkpoints: a partial load would show
        for _, param in trainer.preft_model.adapter_named_parameters():
            param.add_(0.25)
    trainer.step = 0
    before = trainer_state(trainer)
    with pytest.raises(ValueError, match=rf"checkpoint-3/{file}.*resume_from_checkpoint='{tmp_path / 'checkpoint-1'}'"):
        trainer.train(resume_from_checkpoint=True)
    assert_same_trainer_state(before, trainer_state(trainer))
    # the offered previous checkpoint loads
    step, rollout = checkpoint.load(trainer, tmp_path / "checkpoint-1")
    assert step == 1 and rollout is None
    assert not torch.equal(adapter_snapshot(trainer)[next(iter(before[0]))], before[0][next(iter(before[0]))])


def test_a_corrupt_only_checkpoint_says_there_is_no_earlier_one(restored, tmp_path):
    trainer = restored
    trainer.args.output_dir = str(tmp_path)
    checkpoint.save(trainer, 1, None)
    (tmp_path / "checkpoint-1" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint-1/optimizer.pt.*no earlier checkpoint"):
        checkpoint.load(trainer, tmp_path / "checkpoint-1")
    state = json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["step"] == 1


def test_datasets_given_as_rows_are_converted_and_anything_else_is_named():
    from preft_rl.trainers.runtime import as_dataset as _as_dataset

    ds = _as_dataset([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}], "train_dataset")
    assert ds.column_names == ["prompt", "answer"] and len(ds) == 2
    with pytest.raises(TypeError, match="train_dataset must be a datasets.Dataset .* got str"):
        _as_dataset("gsm8k", "train_dataset")


def test_a_completion_no_reward_function_could_score_is_nan_with_advantage_zero(restored, monkeypatch):
    """TRL's rule: a completion every reward function scored None has reward NaN (never a silent 0.0), advantage 0,
    and is left out of its group's mean and std."""
    trainer = restored

    def half_unscorable(prompts, completions, completion_ids, **kwargs):
        return [None if i % 4 == 0 else float(i % 2) for i in range(len(completions))]

    monkeypatch.setattr(trainer, "reward_funcs", [half_unscorable])
    monkeypatch.setattr(trainer, "reward_names", ["half_unscorable"])
    monkeypatch.setattr(trainer, "reward_weights", torch.ones(1))
    batch, _ = trainer._generate_and_score(0)
    unscorable = torch.arange(len(batch.rewards)) % 4 == 0
    assert batch.rewards[unscorable].isnan().all() and not batch.rewards[~unscorable].isnan().any()
    assert (batch.advantages[unscorable] == 0).all() and not batch.advantages.isnan().any()
    n = trainer.args.num_generations
    expected = core.group_advantages(batch.rewards, n, trainer.args.scale_rewards)
    torch.testing.assert_close(batch.advantages, expected)
    metrics = trainer._rollout_metrics(batch)
    assert metrics["reward"] == pytest.approx(batch.rewards[~unscorable].mean().item())


def _overflow_policy(trainer) -> None:
    """A 'bad update': finite weights (B x 1e30) whose prompt activations overflow in the engine."""
    with torch.no_grad():
        for name, param in trainer.preft_model.adapter_named_parameters():
            if "lora_B" in name:
                param.add_(1.0).mul_(1e30)  # + 1: B may still be the zero of the initialisation
    trainer._engine_in_sync = False


def test_an_update_that_overflows_the_engine_is_rolled_back_before_any_rollout_or_file_uses_it(restored, tmp_path):
    """Issue 23, part 3: the policy after a diverged update (finite, so the save checks pass) makes the engine's prompt
    activations non-finite. The rollout that would use it stops with a clear error, the last policy that served is
    back in the model and the engine, and neither a checkpoint nor an adapter file is written with the bad one."""
    from preft_rl.trainers.core import NonFinitePolicyError
    from test_grpo_trainer import assert_engine_serves

    trainer = restored
    trainer.args.output_dir = str(tmp_path)
    trainer._generate_and_score(0)  # this policy serves: the one a bad update goes back to
    good = adapter_snapshot(trainer)
    _overflow_policy(trainer)
    with pytest.raises(NonFinitePolicyError, match=r"non-finite \(NaN or inf\).*No rollout, checkpoint or file used it"):
        trainer._generate_and_score(1)
    assert_same_tensors(good, adapter_snapshot(trainer))  # the last policy that served, in the model
    assert_engine_serves(trainer, trainer.preft_model, dataset(False, n=2)["prompt"])  # and in the engine
    batch, _ = trainer._generate_and_score(1)  # the trainer keeps working
    assert torch.isfinite(batch.old_logps if batch.old_logps is not None else torch.zeros(1)).all()

    _overflow_policy(trainer)  # a bad update right before a save: refused, nothing written
    with pytest.raises(NonFinitePolicyError):
        trainer._check_policy_serves()
    assert list(tmp_path.iterdir()) == []
    assert_same_tensors(good, adapter_snapshot(trainer))
