"""The loss and advantage registries: every registered loss against TRL 1.16's own GRPOTrainer._compute_loss (run on a
minimal trainer object, never reimplemented), numbers by hand for the advantages, and the registry's errors."""

from __future__ import annotations

import doctest
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preft_rl import PreftGRPOConfig
from preft_rl.trainers import advantages as adv_module
from preft_rl.trainers import losses
from preft_rl.trainers.advantages import ADVANTAGE_ESTIMATORS, get_advantage_estimator
from preft_rl.trainers.losses import LOSSES, LossInputs, get_loss

B, T = 4, 6


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Completion-only (B, T) tensors: ratios spread enough that some clip, ragged lengths, every sign of advantage."""
    g = torch.Generator().manual_seed(seed)
    logps = torch.log(torch.rand(B, T, generator=g) * 0.9 + 0.05)
    old = logps + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return dict(logps=logps, old=old, ref=logps + 0.2 * torch.randn(B, T, generator=g), mask=mask,
                advantages=torch.tensor([1.2, -0.7, 0.4, -1.5]), is_weights=torch.rand(B, T, generator=g) * 1.5 + 0.25)


def trl_loss(loss_type: str, x: dict, *, level: str = "token", beta: float, epsilon: float, epsilon_high: float,
             accumulation: int, num_items: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """TRL's GRPOTrainer._compute_loss bound to a minimal object: (loss, d loss / d logps, TRL's metrics)."""
    from trl import GRPOTrainer

    logps = x["logps"].clone().requires_grad_()

    class Accelerator:
        num_processes = 1
        gather = gather_for_metrics = reduce = staticmethod(lambda t, **_: t)

    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, T), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=accumulation),
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, use_vllm=True,
        vllm_importance_sampling_correction=True, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation, accelerator=Accelerator(), _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), max_completion_length=T,
    )
    batch = dict(
        prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
        completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=x["mask"].long(), advantages=x["advantages"],
        old_per_token_logps=x["old"], ref_per_token_logps=x["ref"], importance_sampling_ratio=x["is_weights"],
        num_items_in_batch=torch.tensor(num_items),
    )
    loss = GRPOTrainer._compute_loss.__get__(fake)(None, batch)
    loss.backward()
    return loss.detach(), logps.grad, fake._metrics["train"]


def ours(name: str, x: dict, **settings) -> tuple[torch.Tensor, torch.Tensor, losses.LossOutput]:
    logps = x["logps"].clone().requires_grad_()
    out = get_loss(name)(LossInputs(logps, x["old"], x["advantages"], x["mask"], ref_logps=x["ref"], is_weights=x["is_weights"],
                                    max_completion_length=T, **settings))
    out.loss.backward()
    return out.loss.detach(), logps.grad, out


# (our name, TRL loss_type, TRL importance_sampling_level, epsilon_high)
CASES = [("grpo", "grpo", "token", 0.28), ("bnpo", "bnpo", "token", 0.28), ("dr_grpo", "dr_grpo", "token", 0.28),
         ("dapo", "dapo", "token", 0.28), ("gspo", "grpo", "sequence", 0.28), ("cispo", "cispo", "token", 1.1)]


@pytest.mark.parametrize("name,trl_type,level,eps_high", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_registered_losses_equal_trl(name, trl_type, level, eps_high, beta, accumulation):
    """Loss value (a micro-batch's share when accumulating) and gradient equal TRL's on the same inputs; measured max abs
    difference: loss 0, gradient <= 7.5e-9 (float32 rounding)."""
    pytest.importorskip("trl")
    x = inputs()
    num_items = float(x["mask"].sum()) * accumulation  # the mini-batch's tokens: this micro-batch and its siblings
    trl_value, trl_grad, metrics = trl_loss(trl_type, x, level=level, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                                            accumulation=accumulation, num_items=num_items)
    value, grad, out = ours(name, x, epsilon=0.2, epsilon_high=eps_high, beta=beta, num_items=num_items,
                            num_micro_batches=accumulation)
    assert grad.abs().max() > 1e-3  # the comparison is not of two zeros
    torch.testing.assert_close(value, trl_value, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, trl_grad, atol=1e-7, rtol=1e-5)
    if name in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert out.clip_ratio.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-7)
        assert 0 < out.clip_ratio < 1  # some tokens clip, some do not
    if name == "cispo":
        assert out.clip_ratio.item() == pytest.approx(metrics["cispo_clip_ratio"][0], abs=1e-7) and out.clip_ratio > 0


def test_losses_by_hand_on_a_tiny_batch():
    """On-policy (ratio 1), no KL: the per-token loss is -A, so each aggregation is a count."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    logps = torch.zeros(2, 4)
    x = LossInputs(logps, logps, torch.tensor([1.0, 1.0]), mask, max_completion_length=8, num_items=12.0, num_micro_batches=2)
    expected = {"grpo": -1.0 / 2, "bnpo": -1.0 / 2, "dr_grpo": -6 / 16 / 2, "dapo": -6 / 12, "gspo": -1.0 / 2, "cispo": 0.0}
    for name, value in expected.items():  # cispo: -min(r, cap) A log pi with log pi = 0
        assert LOSSES[name](x).loss.item() == pytest.approx(value), name


def test_advantage_estimators_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    group = get_advantage_estimator("group")(rewards, 3, "none")
    torch.testing.assert_close(group, torch.tensor([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0]))
    batch = get_advantage_estimator("batch")(rewards, 3, "batch")
    torch.testing.assert_close(batch, (rewards - rewards.mean()) / (rewards.std() + 1e-4))
    # RLOO: r_i - mean of its siblings = n / (n - 1) x the group-mean advantage
    rloo = get_advantage_estimator("rloo")(rewards, 3, "none")
    torch.testing.assert_close(rloo, group * 1.5)
    whitened = get_advantage_estimator("rloo")(rewards, 3, "batch")
    torch.testing.assert_close(whitened, (rloo - rloo.mean()) / (rloo.std() + 1e-4))
    rpp = get_advantage_estimator("reinforce_pp")(rewards, 3, "group")
    torch.testing.assert_close(rpp, (group - group.mean()) / (group.std() + 1e-4))
    # an unscorable completion: advantage 0, left out of its siblings' baseline (RLOO over the scorable ones)
    with_nan = torch.tensor([1.0, 0.0, math.nan, 1.0, 1.0, 1.0])
    for name in ADVANTAGE_ESTIMATORS:
        out = get_advantage_estimator(name)(with_nan, 3, "none")
        assert out[2] == 0 and out.isfinite().all(), name
    torch.testing.assert_close(get_advantage_estimator("rloo")(with_nan, 3, "none")[:2], torch.tensor([1.0, -1.0]))
    assert doctest.testmod(adv_module).failed == 0


def test_registry_names_reach_the_config_errors():
    with pytest.raises(ValueError, match=r"loss_type='nope' is not a registered loss: use one of \['bnpo', 'cispo', 'dapo', "
                                         r"'dr_grpo', 'grpo', 'gspo'.*register_loss"):
        PreftGRPOConfig(loss_type="nope")
    with pytest.raises(ValueError, match=r"advantage_estimator='nope' is not registered: use one of \['batch', 'group', "
                                         r"'reinforce_pp', 'rloo'.*register_advantage"):
        PreftGRPOConfig(advantage_estimator="nope")
    with pytest.raises(ValueError, match="loss 'dapo' is already registered"):
        losses.register_loss("dapo")(lambda x: x)
    with pytest.raises(ValueError, match="dynamic_sampling=True needs num_generations >= 2"):
        from preft_rl import PreftPPOConfig

        PreftPPOConfig(dynamic_sampling=True)
    with pytest.raises(ValueError, match="max_dynamic_sampling_draws=0 must be >= 1"):
        PreftGRPOConfig(max_dynamic_sampling_draws=0)


def trl_rloo_advantages(rewards: torch.Tensor, num_generations: int, normalize: bool) -> torch.Tensor:
    """TRL 1.16's RLOOTrainer._generate_and_score_completions on a minimal object whose generation, log-prob pass and
    reward functions are stubs returning fixed values: the advantages its own code computes from `rewards`."""
    from trl import RLOOTrainer

    size = rewards.numel()

    class Accelerator:
        device, process_index, num_processes = torch.device("cpu"), 0, 1
        gather = reduce = staticmethod(lambda t, **_: t)

    fake = SimpleNamespace(
        accelerator=Accelerator(), model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        _generate=lambda prompts: ([[1, 2]] * size, [[3, 4, 5]] * size, ["c"] * size),
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=SimpleNamespace(per_device_train_batch_size=size, gradient_checkpointing_kwargs=None),
        _get_per_token_logps_and_entropies=lambda *a, **k: (torch.zeros(size, 3), None, None), beta=0.0,
        _calculate_rewards=lambda *a: rewards[:, None].clone(), num_generations=num_generations,
        reward_weights=torch.ones(1), reward_clip_range=None, normalize_advantages=normalize, reward_func_names=["r"],
        _metrics=defaultdict(lambda: defaultdict(list)), _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False,
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [], "extra": defaultdict(list)},
    )
    out = RLOOTrainer._generate_and_score_completions.__get__(fake)([{"prompt": "p"}] * size)
    return out["advantages"]


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl_rloo_trainer(normalize):
    """Our 'rloo' (scale_rewards 'none' / 'batch') against TRL's RLOOTrainer (normalize_advantages False / True), with an
    unscorable completion and a group whose rewards all agree; measured max abs difference 0."""
    pytest.importorskip("trl")
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 3.0, 1.0, math.nan, 2.0, 0.2, 0.2, 0.2, 0.2])
    expected = trl_rloo_advantages(rewards, 4, normalize)
    ours_ = get_advantage_estimator("rloo")(rewards, 4, "batch" if normalize else "none")
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(ours_, expected, atol=1e-6, rtol=1e-6)


def trl_grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16's GRPOTrainer._generate_and_score_completions on a minimal object (generation, log-prob passes and
    reward functions stubbed with fixed values): the advantages its own code computes from `rewards`."""
    from trl import GRPOTrainer

    size = rewards.numel()

    class Accelerator:
        device, process_index, num_processes = torch.device("cpu"), 0, 1
        gather = reduce = staticmethod(lambda t, **_: t)

    fake = SimpleNamespace(
        accelerator=Accelerator(), model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None, tools=None, environments=None, _is_vlm=False, use_vllm=False, beta=0.0,
        _generate=lambda prompts: ([[1, 2]] * size, [[3, 4, 5]] * size, None, ["c"] * size, None, {}, None, None),
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=SimpleNamespace(per_device_train_batch_size=size, gradient_checkpointing_kwargs=None, steps_per_generation=1,
                             gradient_accumulation_steps=1, generation_batch_size=size),
        num_iterations=1, _get_per_token_logps_and_entropies=lambda *a, **k: (torch.zeros(size, 3), None, None),
        _calculate_rewards=lambda *a: rewards[:, None].clone(), num_generations=num_generations,
        multi_objective_aggregation="sum_then_normalize", scale_rewards=scale_rewards, reward_weights=torch.ones(1),
        reward_func_names=["r"], reward_funcs=[None], _metrics=defaultdict(lambda: defaultdict(list)),
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False,
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [], "extra": defaultdict(list)},
    )
    out = GRPOTrainer._generate_and_score_completions.__get__(fake)([{"prompt": "p"}] * size)
    return out["advantages"]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_equal_trl_grpo_trainer(scale_rewards):
    """Our 'group' estimator against TRL's GRPOTrainer on the same rewards (an unscorable completion, a group whose
    rewards all agree); measured max abs difference 0."""
    pytest.importorskip("trl")
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 3.0, 1.0, math.nan, 2.0, 0.2, 0.2, 0.2, 0.2])
    expected = trl_grpo_advantages(rewards, 4, scale_rewards)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(get_advantage_estimator("group")(rewards, 4, scale_rewards), expected, atol=1e-6, rtol=1e-6)
