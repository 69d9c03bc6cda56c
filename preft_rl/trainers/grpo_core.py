"""GRPO as pure, shape-documented functions: advantages, log-probs, KL, importance weights; `policy_loss` dispatches
to the loss registry (losses.py).

Conventions follow TRL's GRPOTrainer: rewards are grouped by prompt (num_generations consecutive
completions share one prompt); the policy loss is the PPO-style clipped ratio against the old policy's
log-probs; the engine-vs-trainer mismatch is corrected with a truncated importance-sampling weight;
the KL term is the k3 estimator against the reference (here: the base model, adapter off).
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCALE_REWARDS = ("group", "batch", "none")
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def nanstd(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaN entries (NaN where fewer than two values remain).

    >>> nanstd(torch.tensor([1.0, float("nan"), 3.0])).item()
    1.4142135381698608
    """
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    var = torch.nansum((values - mean) ** 2, dim=dim, keepdim=True) / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """rewards (B,) in prompt-major order -> advantages (B,): reward minus its group's mean, divided by
    the group's ('group') or the batch's ('batch') std, or unscaled ('none').

    A NaN reward (a completion that no reward function could score) is left out of its group's mean and
    std and gets advantage 0: it carries no learning signal and does not shift its group's baseline (TRL's
    rule). For 'batch', pass the rewards of every process (the trainer gathers them first).

    >>> group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "none").tolist()
    [0.5, -0.5, 0.0, 0.0]
    >>> group_advantages(torch.tensor([1.0, 0.0, float("nan"), 1.0, 1.0, 1.0]), 3, "none").tolist()
    [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be (B,) with B divisible by num_generations={num_generations}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: use one of {SCALE_REWARDS}")
    grouped = rewards.view(-1, num_generations)  # (G, n)
    advantages = (grouped - torch.nanmean(grouped, -1, keepdim=True)).view(-1)  # (B,)
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, -1, keepdim=True).expand_as(grouped).reshape(-1) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def selective_log_softmax(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `token_ids`: logits (B, T, V), token_ids (B, T) -> (B, T) fp32.

    Computed row by row so the (B, T, V) fp32 log-softmax is never materialised at once.
    """
    out = []
    for row_logits, row_ids in zip(logits, token_ids):
        row = row_logits.float() / temperature  # (T, V)
        out.append(row.gather(-1, row_ids[:, None])[:, 0] - torch.logsumexp(row, dim=-1))
    return torch.stack(out)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token entropy (B, T) of softmax(logits / temperature)."""
    out = []
    for row_logits in logits:
        logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(out)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (>= 0), (B, T)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def importance_weights(
    old_logps: torch.Tensor,
    engine_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_truncate",
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
) -> torch.Tensor:
    """Importance weights pi_old / pi_engine for tokens sampled by the engine, (B, T), no grad (TRL's modes).

    'token_*': one ratio per token; 'sequence_*': the whole sequence's ratio exp(sum of its token log-ratios),
    broadcast over its tokens. '*_truncate' clips the ratio to [clip_min, clip_max]; '*_mask' sets ratios
    outside that range to 0 (the token or sequence is dropped from the loss). None: no bound on that side.
    """
    if mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode={mode!r}: use one of {IS_MODES}")
    log_ratio = torch.nan_to_num((old_logps - engine_logps).detach() * mask, nan=0.0)
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=clip_min, max=clip_max)
    else:
        low = clip_min if clip_min is not None else -math.inf
        high = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    return ratio * mask


def policy_loss(
    logps: torch.Tensor,  # (B, T) current policy log-probs of the completion tokens
    old_logps: torch.Tensor,  # (B, T) log-probs of the policy that sampled (detached)
    advantages: torch.Tensor,  # (B,) one per sequence (GRPO) or (B, T) one per token (PPO)
    mask: torch.Tensor,  # (B, T) 1 at completion tokens (EOS included), 0 at padding
    *,
    loss_type: str = "dapo",
    **settings: Any,  # the other fields of losses.LossInputs (epsilon, beta, ref_logps, num_items, ...)
):
    """The registered loss `loss_type` (losses.LOSSES: grpo, dr_grpo, dapo, bnpo, gspo, cispo, and any registered
    since) on these inputs: a losses.LossOutput (loss, clip_ratio, kl).

    grpo: mean over each sequence's tokens, then over sequences; dr_grpo: sum / (B * max_completion_length);
    dapo: sum over tokens / completion tokens in the global accumulated batch. With beta > 0 the k3 KL
    against the reference is added per token, times the ratio when use_bias_correction_kl (TRL's default).
    """
    from .losses import LossInputs, get_loss

    return get_loss(loss_type)(LossInputs(logps, old_logps, advantages, mask.to(logps.dtype), **settings))
