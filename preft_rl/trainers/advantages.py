"""Sequence-level advantage estimators as registered pure functions: `advantage_estimator` name -> fn.

Every estimator maps the rewards of the whole batch, gathered over processes, to one advantage per completion:

    fn(rewards: (B,) prompt-major, num_generations consecutive completions per prompt, NaN = unscorable,
       num_generations: int, scale_rewards: "group" | "batch" | "none") -> (B,) advantages, 0.0 where the reward is NaN

A NaN reward (no reward function could score the completion) is left out of every mean and std and gets advantage 0.

    group         r - mean(group), divided by the group's / batch's std (scale_rewards): GRPO (TRL's GRPOTrainer)
    batch         r - mean(batch), divided by the batch's std unless scale_rewards="none": REINFORCE with a batch baseline
    rloo          r - mean(the other completions of its group) (TRL's RLOOTrainer); scale_rewards="batch" whitens the
                  result over the batch (TRL's normalize_advantages=True), "group" divides by the group's std
    reinforce_pp  REINFORCE++-baseline: r - mean(group), then whitened over the batch (always; scale_rewards unused)

A new estimator is one function: `@register_advantage("name")` and `PreftGRPOConfig(advantage_estimator="name")`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .grpo_core import SCALE_REWARDS, group_advantages, nanstd

AdvantageFn = Callable[[torch.Tensor, int, str], torch.Tensor]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage(name: str, *, replace: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: make `fn(rewards, num_generations, scale_rewards) -> advantages` selectable as
    `advantage_estimator=name`."""

    def add(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS and ADVANTAGE_ESTIMATORS[name] is not fn and not replace:
            raise ValueError(f"advantage estimator {name!r} is already registered; pick another name or pass "
                             "register_advantage(name, replace=True)")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


def get_advantage_estimator(name: str) -> AdvantageFn:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator={name!r} is not registered; use one of {sorted(ADVANTAGE_ESTIMATORS)} or "
                         "register one with preft_rl.trainers.advantages.register_advantage")
    return ADVANTAGE_ESTIMATORS[name]


def _grouped(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """(G, n) view of (B,) rewards, after checking the shapes and the scaling name."""
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be (B,) with B divisible by num_generations={num_generations}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: use one of {SCALE_REWARDS}")
    return rewards.view(-1, num_generations)


def whiten_batch(advantages: torch.Tensor) -> torch.Tensor:
    """(B,) (a - nanmean(a)) / (nanstd(a) + 1e-4) over the non-NaN entries (NaN stays NaN)."""
    return (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)


@register_advantage("group")
def group_estimator(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's group-relative advantage (grpo_core.group_advantages).

    >>> group_estimator(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "none").tolist()
    [0.5, -0.5, 0.0, 0.0]
    """
    return group_advantages(rewards, num_generations, scale_rewards)


@register_advantage("batch")
def batch_estimator(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "batch") -> torch.Tensor:
    """r - mean over the whole batch, divided by the batch's std (unless scale_rewards="none"); groups are ignored.

    >>> batch_estimator(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "none").tolist()
    [0.25, -0.75, 0.25, 0.25]
    """
    _grouped(rewards, num_generations, scale_rewards)
    advantages = rewards - torch.nanmean(rewards)  # (B,)
    if scale_rewards != "none":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def leave_one_out(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(B,) r_i - mean of the other scorable rewards of its group; NaN for an unscorable reward or a group with fewer
    than two scorable ones.

    >>> leave_one_out(torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0]), 3).tolist()
    [1.0, -0.5, -0.5, 1.5, -1.5, 0.0]
    """
    grouped = rewards.view(-1, num_generations)  # (G, n)
    counts = (~grouped.isnan()).sum(-1, keepdim=True)  # (G, 1) scorable per group
    others = (torch.nansum(grouped, -1, keepdim=True) - grouped) / (counts - 1)  # (G, n); 0/0 = NaN for a lone one
    return (grouped - others).view(-1)


@register_advantage("rloo")
def rloo_estimator(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "none") -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): the baseline of each completion is its siblings' mean."""
    grouped = _grouped(rewards, num_generations, scale_rewards)
    advantages = leave_one_out(rewards, num_generations)  # (B,)
    if scale_rewards == "batch":
        advantages = whiten_batch(advantages)
    elif scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, -1, keepdim=True).expand_as(grouped).reshape(-1) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@register_advantage("reinforce_pp")
def reinforce_pp_estimator(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "batch") -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): subtract the group's mean, then whiten over the whole batch.

    >>> [round(a, 4) for a in reinforce_pp_estimator(torch.tensor([1.0, 0.0, 3.0, 1.0]), 2).tolist()]
    [0.5477, -0.5477, 1.0953, -1.0953]
    """
    _grouped(rewards, num_generations, scale_rewards)
    centred = group_advantages(rewards, num_generations, "none").masked_fill(rewards.isnan(), math.nan)  # (B,)
    return torch.nan_to_num(whiten_batch(centred), nan=0.0)
