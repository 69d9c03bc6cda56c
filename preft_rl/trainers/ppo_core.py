"""PPO as pure, shape-documented functions: per-token KL, token rewards, mask-aware GAE, whitening, value loss.

All (B, T) tensors are full-width rows of the packed batch (prompt, completion, padding); `mask` is 1 at the
completion tokens whose loss counts and 0 elsewhere. Position t of `values` is the critic's estimate before
token t is generated (read from the hidden state at t - 1), the same alignment as the log-probs. The policy's
clipped-ratio loss is `grpo_core.policy_loss` with one advantage per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of the masked entries: add these over processes, then `whiten`."""
    mask = mask.to(values.dtype)
    return torch.stack([mask.sum(), (values * mask).sum(), (values * values * mask).sum()])


def whiten(values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries (unbiased variance), 0 outside the mask; the mean is kept
    when shift_mean=False. `moments` (from masked_moments, e.g. summed over processes) default to this batch's.

    >>> [round(v, 4) for v in whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1, 1, 0]]))[0].tolist()]
    [-0.7071, 0.7071, 0.0]
    """
    count, total, squares = (moments if moments is not None else masked_moments(values, mask)).tolist()
    mean = total / max(count, 1)
    var = (squares - count * mean * mean) / max(count - 1, 1)
    out = (values - mean) / (max(var, 0.0) + 1e-8) ** 0.5
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman's k1 / k3).

    k1 = logp - ref (unbiased, can be negative); k3 = e^(ref - logp) - (ref - logp) - 1 (unbiased, >= 0).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}: use one of {KL_ESTIMATORS}")
    diff = ref_logps - logps
    return -diff if estimator == "k1" else torch.exp(diff) - diff - 1


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(B, T) per-token rewards: -kl_coef * kl at every completion token, plus the sequence's score (B,) at its
    last completion token. Rows with no completion token get nothing.

    >>> token_rewards(torch.tensor([1.0]), torch.tensor([[0.0, 0.5, 0.5, 0.0]]), torch.tensor([[0, 1, 1, 0]]), 0.1).tolist()
    [[0.0, -0.05000000074505806, 0.949999988079071, 0.0]]
    """
    rewards = torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(-1).values  # (B,) index of the last completion token
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (completion) tokens: (advantages, returns), both (B, T), 0
    outside the mask. Values and rewards at unmasked positions (prompt, after EOS, padding) change nothing: the
    value after the last completion token is 0 (the episode ends there).

        delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};   R_t = A_t + V_t

    >>> adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.ones(1, 2), gamma=1.0, lam=1.0)
    >>> adv.tolist(), ret.tolist()
    ([[0.5, 0.5]], [[1.0, 1.0]])
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]  # both 0 at unmasked positions
    return advantages, (advantages + values) * mask


@dataclass
class ValueLossOutput:
    loss: torch.Tensor  # scalar
    clip_fraction: torch.Tensor  # fraction of tokens where the clipped loss was the larger (no grad)


def value_loss(
    values: torch.Tensor,  # (B, T) current critic estimates
    old_values: torch.Tensor,  # (B, T) estimates at rollout time
    returns: torch.Tensor,  # (B, T) GAE returns
    mask: torch.Tensor,  # (B, T)
    cliprange_value: float = 0.2,
    num_items: float | None = None,  # tokens to average over (default: this batch's masked tokens)
) -> ValueLossOutput:
    """0.5 * mean over tokens of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, +-cliprange_value).

    >>> out = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    >>> round(out.loss.item(), 4), out.clip_fraction.item()
    (0.32, 1.0)
    """
    mask = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped - returns) ** 2
    per_token = torch.max(unclipped_loss, clipped_loss)
    denominator = num_items if num_items is not None else mask.sum().clamp(min=1)
    loss = 0.5 * (per_token * mask).sum() / denominator
    clip_fraction = masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask).detach()
    return ValueLossOutput(loss=loss, clip_fraction=clip_fraction)
