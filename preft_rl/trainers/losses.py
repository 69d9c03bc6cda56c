"""Policy losses as registered pure functions: `loss_type` name -> fn(LossInputs) -> LossOutput.

Every loss returns its rows' SHARE of the mini-batch objective: the objective of one optimizer step is the sum of the
losses of its micro-batches. A loss normalised by something local to the micro-batch (its sequences, its tokens)
divides by `num_micro_batches`; one normalised by the whole mini-batch (`num_items`, DAPO) does not. The trainer's
core undoes accelerate's division by gradient_accumulation_steps, so a loss never has to. Called on a whole batch
with the defaults (num_micro_batches=1, num_items=None: this batch's tokens), a loss is the plain objective.

The registered losses follow TRL 1.16's GRPOTrainer._compute_loss (tests/test_losses.py runs TRL's code on the same
inputs): grpo, dr_grpo, dapo, bnpo, cispo, and gspo (TRL's importance_sampling_level="sequence" with loss_type="grpo").

A new loss is one function:

    @register_loss("my_loss")
    def my_loss(x: LossInputs) -> LossOutput:
        ratio = torch.exp(token_log_ratio(x))                      # (B, T)
        per_token, kl = add_penalties(x, clipped_surrogate(x, ratio), ratio)
        return LossOutput(global_token_mean(x, per_token), clipped_fraction(x, ratio), kl)

then `PreftGRPOConfig(loss_type="my_loss")`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .grpo_core import k3_kl


@dataclass
class LossInputs:
    """What a policy loss sees for one micro-batch of B rows of T positions (full rows: prompt, completion, padding)."""

    logps: torch.Tensor  # (B, T) current policy log-probs of each token (with grad)
    old_logps: torch.Tensor  # (B, T) log-probs of the policy that sampled (detached)
    advantages: torch.Tensor  # (B,) one per sequence (GRPO) or (B, T) one per token (PPO)
    mask: torch.Tensor  # (B, T) 1.0 at completion tokens whose loss counts, 0.0 elsewhere
    ref_logps: torch.Tensor | None = None  # (B, T) adapter-off base log-probs, needed when beta > 0
    is_weights: torch.Tensor | None = None  # (B, T) engine-vs-trainer importance weights (detached)
    epsilon: float = 0.2  # lower clipping range of the ratio
    epsilon_high: float | None = None  # upper clipping range (None: epsilon); CISPO: the cap of the ratio itself
    beta: float = 0.0  # weight of the k3 KL against the reference
    use_bias_correction_kl: bool = True  # multiply the KL by pi_theta / pi_old (TRL's default)
    max_completion_length: int | None = None  # dr_grpo's constant
    num_items: float | None = None  # completion tokens in the whole mini-batch (over processes / process count)
    num_micro_batches: int = 1  # micro-batches in the mini-batch (the share of a locally normalised loss)

    @property
    def adv(self) -> torch.Tensor:
        """(B, 1) per sequence or (B, T) per token: broadcastable against (B, T)."""
        return self.advantages[:, None] if self.advantages.dim() == 1 else self.advantages

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: these rows' share of the mini-batch objective
    clip_ratio: torch.Tensor  # fraction of completion tokens whose ratio was clipped (scalar, no grad)
    kl: torch.Tensor | None  # mean per-token k3 KL (scalar, no grad) when beta > 0


LossFn = Callable[[LossInputs], LossOutput]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str, *, replace: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: make `fn(LossInputs) -> LossOutput` selectable as `loss_type=name`."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES and LOSSES[name] is not fn and not replace:
            raise ValueError(f"loss {name!r} is already registered ({LOSSES[name].__qualname__}); pick another name or pass "
                             "register_loss(name, replace=True)")
        LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"loss_type={name!r} is not a registered loss; use one of {sorted(LOSSES)} or register one with "
                         "preft_rl.trainers.losses.register_loss")
    return LOSSES[name]


# ------------------------------------------------------------------------------------------ building blocks
def token_log_ratio(x: LossInputs) -> torch.Tensor:
    """(B, T) log pi_theta / pi_old per token."""
    return x.logps - x.old_logps


def sequence_log_ratio(x: LossInputs) -> torch.Tensor:
    """(B, 1) GSPO's sequence-level log-ratio: the mean of the token log-ratios over the completion (length-normalised),
    with the gradient of every token."""
    mask = x.mask.to(x.logps.dtype)
    return ((token_log_ratio(x) * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]


def clipped_surrogate(x: LossInputs, ratio: torch.Tensor) -> torch.Tensor:
    """(B, T) PPO's clipped objective, negated: -min(r A, clip(r, 1 - eps, 1 + eps_high) A); ratio (B, T) or (B, 1)."""
    clipped = torch.clamp(ratio, 1 - x.epsilon, 1 + x.eps_high)
    return -torch.min(ratio * x.adv, clipped * x.adv).expand_as(x.mask)


def clipped_fraction(x: LossInputs, ratio: torch.Tensor) -> torch.Tensor:
    """Fraction of completion tokens whose ratio is outside the clip range on the side that stops the gradient."""
    is_clipped = ((ratio < 1 - x.epsilon) & (x.adv < 0)) | ((ratio > 1 + x.eps_high) & (x.adv > 0))
    return masked_mean(is_clipped.to(x.mask.dtype).expand_as(x.mask), x.mask).detach()


def add_penalties(x: LossInputs, per_token: torch.Tensor, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) per-token loss times the engine-mismatch importance weights, plus beta x the k3 KL against the reference
    (times the ratio when use_bias_correction_kl); and the mean plain k3 KL to log (None when beta == 0)."""
    if x.is_weights is not None:
        per_token = per_token * x.is_weights
    if x.beta <= 0:
        return per_token, None
    if x.ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (the base model's log-probs)")
    per_token_kl = k3_kl(x.logps, x.ref_logps)  # (B, T)
    kl = masked_mean(per_token_kl, x.mask).detach()
    if x.use_bias_correction_kl:  # the ratio keeps its gradient: the unbiased reverse-KL gradient off-policy
        per_token_kl = per_token_kl * ratio
    return per_token + x.beta * per_token_kl, kl


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


# aggregations: (B, T) per-token loss -> this micro-batch's share of the mini-batch objective
def sequence_mean(x: LossInputs, per_token: torch.Tensor) -> torch.Tensor:
    """GRPO: mean over each sequence's tokens, then over the micro-batch's sequences."""
    mask = x.mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean() / x.num_micro_batches


def local_token_mean(x: LossInputs, per_token: torch.Tensor) -> torch.Tensor:
    """BNPO: mean over the micro-batch's completion tokens."""
    return masked_mean(per_token, x.mask) / x.num_micro_batches


def constant_normaliser(x: LossInputs, per_token: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: token sum / (sequences x max_completion_length), a constant that carries no length bias."""
    if not x.max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    return (per_token * x.mask).sum() / (per_token.shape[0] * x.max_completion_length) / x.num_micro_batches


def global_token_mean(x: LossInputs, per_token: torch.Tensor) -> torch.Tensor:
    """DAPO: token sum / completion tokens of the whole mini-batch (num_items; default: this batch's tokens)."""
    return (per_token * x.mask).sum() / (x.num_items if x.num_items is not None else x.mask.sum().clamp(min=1))


# ------------------------------------------------------------------------------------------ the registered losses
def _clipped_token_loss(x: LossInputs, aggregate: Callable[[LossInputs, torch.Tensor], torch.Tensor]) -> LossOutput:
    ratio = torch.exp(token_log_ratio(x))  # (B, T)
    per_token, kl = add_penalties(x, clipped_surrogate(x, ratio), ratio)
    return LossOutput(aggregate(x, per_token), clipped_fraction(x, ratio), kl)


@register_loss("grpo")
def grpo_loss(x: LossInputs) -> LossOutput:
    """Clipped token ratio; each sequence's mean, averaged over sequences (DeepSeekMath; length-biased)."""
    return _clipped_token_loss(x, sequence_mean)


@register_loss("bnpo")
def bnpo_loss(x: LossInputs) -> LossOutput:
    """Clipped token ratio; the mean over the micro-batch's tokens."""
    return _clipped_token_loss(x, local_token_mean)


@register_loss("dr_grpo")
def dr_grpo_loss(x: LossInputs) -> LossOutput:
    """Clipped token ratio; token sum over sequences x max_completion_length (Dr. GRPO)."""
    return _clipped_token_loss(x, constant_normaliser)


@register_loss("dapo")
def dapo_loss(x: LossInputs) -> LossOutput:
    """Clipped token ratio; token sum over the mini-batch's completion tokens (DAPO, TRL's default)."""
    return _clipped_token_loss(x, global_token_mean)


@register_loss("gspo")
def gspo_loss(x: LossInputs) -> LossOutput:
    """GSPO: one ratio per sequence, exp(mean token log-ratio), clipped; each sequence's mean, over sequences (TRL's
    importance_sampling_level="sequence" with loss_type="grpo"; the paper uses tiny epsilons such as 3e-4 / 4e-4)."""
    ratio = torch.exp(sequence_log_ratio(x))  # (B, 1)
    per_token, kl = add_penalties(x, clipped_surrogate(x, ratio), ratio)
    return LossOutput(sequence_mean(x, per_token), clipped_fraction(x, ratio), kl)


@register_loss("cispo")
def cispo_loss(x: LossInputs) -> LossOutput:
    """CISPO (MiniMax-M1): -min(r, eps_high).detach() x A x log pi; every token keeps a gradient; epsilon_high is the
    cap of the ratio itself (TRL's meaning; ScaleRL recommends 5.0); aggregated like dapo."""
    ratio = torch.exp(token_log_ratio(x))  # (B, T)
    weight = torch.clamp(ratio, max=x.eps_high).detach()
    per_token, kl = add_penalties(x, -weight * x.adv * x.logps, ratio)
    truncated = ((ratio > x.eps_high) & (x.adv > 0)).to(x.mask.dtype)
    return LossOutput(global_token_mean(x, per_token), masked_mean(truncated.expand_as(x.mask), x.mask).detach(), kl)
