"""The trainer step's hooks on a real trainer (tiny Llama, fp32, CPU): the core's loss scaling gives the gradient of the
whole mini-batch's loss, the micro-batch count is checked, DAPO dynamic sampling drops exactly the zero-variance groups
of a rollout whose group variances are known, and reward error counts reach log.jsonl per step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from preft_rl import PreftConfig, PreftGRPOTrainer
from preft_rl.rewards.math import RewardErrorCounter
from preft_rl.trainers.grpo_core import policy_loss
from preft_rl.trainers.rollout import groups_with_signal
from test_grpo_trainer import config

pytest.importorskip("vllm")

N = 4  # completions per prompt
GROUPS = 2  # groups per rollout: per_device_train_batch_size 4 x gradient_accumulation_steps 2 / N


def kind_reward(prompts, completions, completion_ids=None, kind=None, **_):
    """Known group variances: a 'same' prompt scores 1.0 for every completion (zero variance, and one counted internal
    error per completion); a 'spread' prompt scores its completion's place in the group, 0, 1, 2, 3."""
    for k in kind:
        if k == "same":
            kind_reward.errors.add()
    return [1.0 if k == "same" else float(i % N) for i, k in enumerate(kind)]


kind_reward.errors = RewardErrorCounter()


def rows(kinds: list[str]) -> Dataset:
    return Dataset.from_list([{"prompt": f"how many books {i} pears?", "kind": k} for i, k in enumerate(kinds)])


@pytest.fixture(scope="module")
def trainer(tiny_llama_dir, tmp_path_factory):
    args = config(tmp_path_factory.mktemp("trainer-step"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  num_generations=N, max_steps=2, learning_rate=1e-2, dynamic_sampling=True, max_dynamic_sampling_draws=8)
    trainer = PreftGRPOTrainer(str(tiny_llama_dir), kind_reward, args=args, train_dataset=rows(["same"] * 8 + ["spread"] * 4),
                               preft_config=PreftConfig(method="lora", r=4))
    yield trainer
    trainer.close()


def expected_rollout(trainer, step: int) -> tuple[int, int]:
    """(draws, zero-variance groups dropped) that dynamic sampling needs for `step`, read off the prompts it draws."""
    draws, kept, dropped = 0, 0, 0
    while kept < GROUPS and draws < trainer.args.max_dynamic_sampling_draws:
        for row in trainer._prompts_for_step(step, draws):
            if row["kind"] == "same":
                dropped += 1
            elif kept < GROUPS:
                kept += 1
        draws += 1
    return draws, dropped


def test_group_filter_keeps_groups_whose_rewards_differ():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, nan, 0.5, nan, nan, 2.0, 2.0, 0.0, 0.0, 0.0, 1e-6])
    assert groups_with_signal(rewards, 4).tolist() == [True, True, False, True]
    assert groups_with_signal(torch.tensor([nan, 3.0, 2.0, 2.0]), 2).tolist() == [False, False]  # one scorable: no signal
    with pytest.raises(ValueError, match="divisible by num_generations=4"):
        groups_with_signal(torch.ones(6), 4)


def test_dynamic_sampling_drops_zero_variance_groups_and_logs_draws_and_errors(trainer):
    expected = [expected_rollout(trainer, step) for step in range(2)]
    assert max(draws for draws, _ in expected) > 1  # the data make it draw again (8 of 12 prompts are 'same')
    batch, timings = trainer._generate_and_score(0)
    assert batch.input_ids.shape[0] == GROUPS * N  # the batch is full
    # every kept group is a 'spread' one: rewards 0, 1, 2, 3, and none has zero variance
    assert batch.rewards.view(GROUPS, N).tolist() == [[0.0, 1.0, 2.0, 3.0]] * GROUPS
    assert (timings["rollout/draws"], timings["rollout/groups_dropped"]) == (float(expected[0][0]), float(expected[0][1]))
    assert timings["rollout/groups_refilled"] == 0.0
    assert timings["rewards/kind_reward/errors"] == N * expected[0][1]  # one per scored 'same' completion

    trainer.train()
    log = [json.loads(line) for line in (Path(trainer.args.output_dir) / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    for row, (draws, dropped) in zip(log, expected):
        assert (row["rollout/draws"], row["rollout/groups_dropped"]) == (draws, dropped)
        assert row["rewards/kind_reward/errors"] == N * dropped  # this step's errors, in log.jsonl
        assert row["frac_reward_zero_std"] == 0.0 and row["reward"] == pytest.approx(1.5)
    assert log[-1]["rewards/kind_reward/error_count"] == kind_reward.errors.count  # the running total too


def test_dynamic_sampling_fills_a_batch_still_short_at_the_cap(trainer, monkeypatch, caplog):
    monkeypatch.setattr(trainer, "train_dataset", rows(["same"] * 4))
    monkeypatch.setattr(trainer.args, "max_dynamic_sampling_draws", 3)
    with caplog.at_level(logging.WARNING, logger="preft_rl.trainers.core"):
        batch, timings = trainer._generate_and_score(0)
    # 3 draws of 2 'same' groups: 2 fill the batch (advantage 0), the other 4 are dropped
    assert (timings["rollout/draws"], timings["rollout/groups_dropped"], timings["rollout/groups_refilled"]) == (3.0, 4.0, 2.0)
    assert batch.input_ids.shape[0] == GROUPS * N and torch.equal(batch.advantages, torch.zeros(GROUPS * N))
    assert any("missing after 3 draws" in r.message for r in caplog.records)


def test_without_dynamic_sampling_one_draw_keeps_every_group(trainer, monkeypatch):
    monkeypatch.setattr(trainer.args, "dynamic_sampling", False)
    batch, timings = trainer._generate_and_score(0)
    assert timings["rollout/draws"] == 1.0 and "rollout/groups_dropped" not in timings
    kinds = [row["kind"] for row in trainer._prompts_for_step(0)]
    assert batch.rewards.view(GROUPS, N).tolist() == [[1.0] * N if k == "same" else [0.0, 1.0, 2.0, 3.0] for k in kinds]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_accumulated_gradient_equals_the_whole_mini_batch_loss(trainer, monkeypatch, loss_type):
    """Two micro-batches through the core (each loss a share, the core undoing accelerate's division) give the gradient
    of the registered loss on the whole mini-batch in one call: the gradient the code gave before the core owned the
    scaling (grpo and dr_grpo: accelerate's mean of micro-batch losses; dapo: the micro-batch losses times 2)."""
    monkeypatch.setattr(trainer.args, "dynamic_sampling", False)
    monkeypatch.setattr(trainer.args, "loss_type", loss_type)
    monkeypatch.setattr(trainer.args, "max_grad_norm", 0.0)  # no clipping: clip_grad_norm_ scales by exactly 1
    monkeypatch.setattr(trainer.args, "share_prompt_forward", False)  # the same forward for 4 and for 8 rows
    params = dict(trainer.preft_model.adapter_named_parameters())
    batch, _ = trainer._generate_and_score(0)
    assert batch.advantages.abs().sum() > 0
    captured = {}
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: captured.update({n: p.grad.clone() for n, p in params.items()}))
    stats = trainer._optimizer_step(batch)

    trainer.optimizer.zero_grad(set_to_none=True)
    args, everything = trainer.args, slice(None)
    mask = batch.completion_mask.float()
    logps, _ = trainer._completion_logps(batch, everything)
    out = policy_loss(logps, logps.detach(), batch.advantages, mask, loss_type=loss_type, epsilon=args.epsilon,
                      is_weights=trainer._importance_weights(batch, everything, logps.detach(), mask),
                      max_completion_length=args.max_completion_length, num_items=float(mask.sum()))
    out.loss.backward()
    assert stats["loss"] == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-7)  # the logged loss is the mini-batch's
    for name, param in params.items():
        assert param.grad.abs().max() > 0, name
        torch.testing.assert_close(captured[name], param.grad, rtol=1e-5, atol=1e-7)
    trainer.optimizer.zero_grad(set_to_none=True)


def test_mini_batches_must_hold_gradient_accumulation_steps_micro_batches(trainer, monkeypatch):
    monkeypatch.setattr(trainer.args, "dynamic_sampling", False)
    batch, _ = trainer._generate_and_score(0)
    monkeypatch.setattr(trainer, "_mini_batches", lambda b: [b.micro_batches(4)[:1]])
    with pytest.raises(ValueError, match=r"_mini_batches returned a mini-batch of 1 micro-batch\(es\) but "
                                         r"gradient_accumulation_steps=2.*exactly 2"):
        trainer._optimizer_step(batch)
