"""PPO's building blocks as pure functions: numbers checked by hand and against a plain loop."""

from __future__ import annotations

import doctest

import pytest
import torch

from preft_rl.trainers import ppo_core as core


def test_doctests():
    result = doctest.testmod(core)
    assert result.attempted > 0 and result.failed == 0, result


def gae_by_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """One sequence's completion tokens only, scalar by scalar: the textbook recursion."""
    advantages = [0.0] * len(rewards)
    next_value, next_advantage = 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        advantages[t] = delta + gamma * lam * next_advantage
        next_value, next_advantage = values[t], advantages[t]
    return advantages, [a + v for a, v in zip(advantages, values)]


def padded_batch(seed: int = 0):
    """3 rows: 2 prompt tokens, then 3 / 5 / 1 completion tokens, then padding (garbage values outside the mask)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for row, n in enumerate((3, 5, 1)):
        mask[row, 2 : 2 + n] = True
    rewards, values = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    return rewards, values, mask


def test_gae_with_gamma_and_lambda_one_gives_reward_to_go():
    rewards, values, mask = padded_batch()
    advantages, returns = core.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask
    torch.testing.assert_close(returns, to_go)
    torch.testing.assert_close(advantages, (to_go - values) * mask)


def test_gae_with_lambda_zero_gives_the_td_errors():
    rewards, values, mask = padded_batch()
    advantages, _ = core.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(3, 1)], dim=1)
    torch.testing.assert_close(advantages, (rewards + 0.9 * next_values - values) * mask)


def test_gae_ignores_values_and_rewards_outside_the_mask_and_equals_the_loop():
    rewards, values, mask = padded_batch()
    advantages, returns = core.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    other_rewards, other_values, _ = padded_batch(seed=1)  # different garbage at prompt, after-EOS and padding positions
    outside = ~mask
    advantages2, returns2 = core.gae(torch.where(outside, other_rewards, rewards), torch.where(outside, other_values, values),
                                     mask, gamma=0.95, lam=0.9)
    assert torch.equal(advantages, advantages2) and torch.equal(returns, returns2)
    assert (advantages[outside] == 0).all() and (returns[outside] == 0).all()
    for row in range(3):
        expected_adv, expected_ret = gae_by_loop(rewards[row][mask[row]].tolist(), values[row][mask[row]].tolist(), 0.95, 0.9)
        torch.testing.assert_close(advantages[row][mask[row]], torch.tensor(expected_adv))
        torch.testing.assert_close(returns[row][mask[row]], torch.tensor(expected_ret))


def test_value_loss_clipping_by_hand():
    old, returns, mask = torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    values = torch.tensor([[1.0, 0.1, 9.0]], requires_grad=True)
    out = core.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: V moved 1.0 towards the return, clipped to 0.2: max((1-1)^2, (0.2-1)^2) = 0.64, the clipped term (no grad)
    # token 1: V moved 0.1 (inside the range): (0.1+1)^2 = 1.21 both ways; token 2 is masked out
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (0.64 + 1.21) / 2))
    torch.testing.assert_close(out.clip_fraction, torch.tensor(0.5))
    out.loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5 * 2 * 1.1 / 2, 0.0]]))


def test_token_rewards_kl_estimators_and_whitening():
    logps, ref = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.4]]))
    torch.testing.assert_close(core.kl_per_token(logps, ref, "k1"), logps - ref)
    d = ref - logps
    torch.testing.assert_close(core.kl_per_token(logps, ref, "k3"), d.exp() - d - 1)
    with pytest.raises(ValueError, match="kl_estimator='k2'"):
        core.kl_per_token(logps, ref, "k2")
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    kl = torch.full((2, 4), 0.5)
    rewards = core.token_rewards(torch.tensor([2.0, 7.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 1.95, 0.0], [0.0, 0.0, 0.0, 0.0]]))  # no tokens: no score
    # whitening with moments summed over "processes" equals whitening the concatenation
    a, b = torch.randn(2, 5), torch.randn(3, 5)
    ma, mb = torch.rand(2, 5) > 0.3, torch.rand(3, 5) > 0.3
    whole = core.whiten(torch.cat([a, b]), torch.cat([ma, mb]))
    moments = core.masked_moments(a, ma) + core.masked_moments(b, mb)
    torch.testing.assert_close(torch.cat([core.whiten(a, ma, moments), core.whiten(b, mb, moments)]), whole)
    kept = core.whiten(a, ma, shift_mean=False)
    torch.testing.assert_close(core.masked_mean(kept, ma), core.masked_mean(a, ma))
