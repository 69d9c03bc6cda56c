"""The GRPO building blocks as pure functions: numbers checked by hand."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from preft_rl.trainers import grpo_core as core


def test_doctests():
    result = doctest.testmod(core)
    assert result.attempted > 0 and result.failed == 0, result  # a runner that finds no example must fail


def test_group_advantages_scalings():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    none = core.group_advantages(rewards, 3, "none")
    torch.testing.assert_close(none, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0]))
    group = core.group_advantages(rewards, 3, "group")
    std0, std1 = rewards[:3].std(), rewards[3:].std()
    torch.testing.assert_close(group, torch.cat([none[:3] / (std0 + 1e-4), none[3:] / (std1 + 1e-4)]))
    torch.testing.assert_close(core.group_advantages(rewards, 3, "batch"), none / (rewards.std() + 1e-4))
    assert torch.equal(core.group_advantages(torch.ones(4), 2, "group"), torch.zeros(4))  # no signal, no update
    with pytest.raises(ValueError, match="divisible by num_generations=4"):
        core.group_advantages(torch.ones(6), 4)


def test_selective_log_softmax_and_entropy():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(core.selective_log_softmax(logits, ids, 0.7), expected)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(core.entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_on_policy_loss_value_and_gradient():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]])).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    out = core.policy_loss(logps, logps.detach(), adv, mask, loss_type="dapo")
    # ratio 1 everywhere: loss = -(sum of A over completion tokens) / tokens = -(2*1 + 3*(-2)) / 5
    torch.testing.assert_close(out.loss, torch.tensor(4 / 5))
    out.loss.backward()
    torch.testing.assert_close(logps.grad, -adv[:, None] * mask / 5)
    assert out.clip_ratio == 0 and out.kl is None


def test_loss_type_normalisations():
    logps = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, 1.0])
    grpo = core.policy_loss(logps, logps, adv, mask, loss_type="grpo").loss  # mean of per-seq means
    dr = core.policy_loss(logps, logps, adv, mask, loss_type="dr_grpo", max_completion_length=8).loss
    dapo = core.policy_loss(logps, logps, adv, mask, loss_type="dapo", num_items=12.0).loss
    torch.testing.assert_close(grpo, torch.tensor(-1.0))
    torch.testing.assert_close(dr, torch.tensor(-6 / 16))
    torch.testing.assert_close(dapo, torch.tensor(-6 / 12))


def test_clipping_stops_the_gradient_of_clipped_tokens():
    old = torch.zeros(1, 2)
    logps = torch.tensor([[0.5, 0.1]], requires_grad=True)  # ratios e^0.5 = 1.65 (clipped), e^0.1 = 1.1
    out = core.policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2), epsilon=0.2, epsilon_high=0.28)
    out.loss.backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] < 0
    torch.testing.assert_close(out.clip_ratio, torch.tensor(0.5))


def test_kl_term_and_importance_weights():
    logps = torch.log(torch.tensor([[0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    kl = core.k3_kl(logps, ref)
    torch.testing.assert_close(kl, torch.tensor([[0.5 + 0.6931472 - 1, 0.0]]))  # e^d - d - 1 at d = ln 0.5
    out = core.policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logps=ref)
    torch.testing.assert_close(out.loss, 0.1 * kl.sum() / 2)
    with pytest.raises(ValueError, match="needs ref_logps"):
        core.policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)
    old = torch.log(torch.tensor([[0.9, 0.1, 0.5]]))
    engine = torch.log(torch.tensor([[0.1, 0.1, 0.5]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w = core.importance_weights(old, engine, mask, "token_truncate", clip_max=3.0)
    torch.testing.assert_close(w, torch.tensor([[3.0, 1.0, 0.0]]))  # 9 clipped to 3; padding 0
    ws = core.importance_weights(old, engine, mask, "sequence_truncate", clip_max=10.0)
    torch.testing.assert_close(ws, torch.tensor([[9.0, 9.0, 0.0]]))  # the sequence's ratio: 9 x 1
    torch.testing.assert_close(core.importance_weights(old, engine, mask, "sequence_truncate", clip_max=3.0), torch.tensor([[3.0, 3.0, 0.0]]))
    torch.testing.assert_close(core.importance_weights(old, engine, mask, "token_mask", clip_max=3.0), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(core.importance_weights(old, engine, mask, "sequence_mask", clip_max=3.0), torch.zeros(1, 3))
    torch.testing.assert_close(  # a lower bound: ratio 1/9 clipped up to 0.5, or masked
        core.importance_weights(engine, old, mask, "token_truncate", clip_max=None, clip_min=0.5), torch.tensor([[0.5, 1.0, 0.0]]))
    torch.testing.assert_close(core.importance_weights(engine, old, mask, "token_mask", clip_max=None, clip_min=0.5), torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("correct", [True, False])
def test_kl_bias_correction_gradient_by_hand(correct):
    """One token, advantage 0, so the loss is beta * k3 (times pi/pi_old when corrected). With d = ref - logp:
    on-policy the corrected gradient is beta * (-d), the k1 (reverse-KL) gradient; uncorrected it is beta * (1 - e^d).
    Off-policy (old = logp - 0.3) the corrected value and gradient carry the ratio e^0.3."""
    beta, d = 0.1, math.log(0.5)
    for shift in (0.0, 0.3):
        logps = torch.tensor([[math.log(0.5)]], requires_grad=True)
        ref, old = logps.detach() + d, logps.detach() - shift
        out = core.policy_loss(logps, old, torch.zeros(1), torch.ones(1, 1), beta=beta, ref_logps=ref, use_bias_correction_kl=correct)
        out.loss.backward()
        k3 = math.exp(d) - d - 1
        ratio = math.exp(shift) if correct else 1.0
        grad = ratio * ((1 - math.exp(d)) + (k3 if correct else 0.0))
        torch.testing.assert_close(out.loss, torch.tensor(beta * k3 * ratio))
        torch.testing.assert_close(logps.grad, torch.tensor([[beta * grad]]))
        torch.testing.assert_close(out.kl, torch.tensor(k3))  # the logged KL is the plain k3 estimate
        if correct and shift == 0.0:
            torch.testing.assert_close(logps.grad, torch.tensor([[-beta * d]]))


def test_unscorable_completions_get_advantage_zero_and_leave_their_group_alone():
    nan = math.nan
    rewards = torch.tensor([1.0, 0.0, nan, 2.0, nan, nan])
    for scale in ("none", "group", "batch"):
        adv = core.group_advantages(rewards, 3, scale)
        assert adv[2] == 0 and adv[4] == 0 and adv[5] == 0
        assert not adv.isnan().any()
    torch.testing.assert_close(core.group_advantages(rewards, 3, "none")[:2], torch.tensor([0.5, -0.5]))  # mean of 1 and 0
    group = core.group_advantages(rewards, 3, "group")
    torch.testing.assert_close(group[:2], torch.tensor([0.5, -0.5]) / (math.sqrt(0.5) + 1e-4))
    assert group[3] == 0  # the only scorable completion of its group: no baseline, no signal
    batch_std = torch.tensor([1.0, 0.0, 2.0]).std()
    torch.testing.assert_close(core.group_advantages(rewards, 3, "batch")[:2], torch.tensor([0.5, -0.5]) / (batch_std + 1e-4))
