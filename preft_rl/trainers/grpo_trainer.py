"""PreftGRPOTrainer: GRPO on a prefill-only adapter, on the shared RL core (core.py).

GRPO fills three hooks: advantages from the registered estimator `advantage_estimator` (advantages.py; rewards
gathered over every process, so 'batch' scaling sees the whole batch), the registered loss `loss_type` (losses.py),
and the log-prob passes it needs (old policy when a rollout is reused, the adapter-off base when beta > 0). A variant
that changes only its loss or advantage registers a function and needs no subclass (docs/design/trainer.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .advantages import get_advantage_estimator
from .core import MiniBatch, PreftRLTrainer
from .grpo_config import PreftGRPOConfig
from .grpo_core import policy_loss
from .rollout import RolloutBatch


class PreftGRPOTrainer(PreftRLTrainer):
    config_class = PreftGRPOConfig
    display_name = "PreFT GRPO"
    args: PreftGRPOConfig

    def __new__(cls, *args: Any, tenants: Any = None, **kwargs: Any) -> PreftGRPOTrainer:
        if tenants is not None and cls is PreftGRPOTrainer:  # many tenants' adapters in one run (multitenant.py)
            from .multitenant import MultiTenantGRPOTrainer

            cls = MultiTenantGRPOTrainer
        return super().__new__(cls)

    def _needs_old_logps(self) -> bool:
        return self.args.num_iterations > 1

    def _needs_ref_logps(self) -> bool:
        return self.args.beta > 0

    def _compute_advantages(self, batch: RolloutBatch) -> None:
        # over all processes: groups never span processes, but the 'batch' std is the whole batch's (as in TRL)
        estimator = get_advantage_estimator(self.args.advantage_estimator)
        advantages = estimator(self._gather(batch.rewards), self.args.num_generations, self.args.scale_rewards)
        batch.advantages = self._local_rows(advantages)

    def _policy_loss(self, logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     ref: torch.Tensor | None, is_weights: torch.Tensor | None, num_items: float, num_micro_batches: int):
        """The configured loss (loss_type and its settings) on these rows: a losses.LossOutput."""
        args = self.args
        return policy_loss(
            logps, old, advantages, mask, loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
            beta=args.beta, use_bias_correction_kl=args.use_bias_correction_kl, ref_logps=ref, is_weights=is_weights,
            max_completion_length=args.max_completion_length, num_items=num_items, num_micro_batches=num_micro_batches,
        )

    def _compute_loss(self, batch: RolloutBatch, rows: Any, mini: MiniBatch) -> tuple[torch.Tensor, dict[str, float]]:
        args, device = self.args, self.accelerator.device
        mask = batch.completion_mask[rows].to(device).float()
        logps, entropy = self._completion_logps(batch, rows, with_entropy=True)
        old = batch.old_logps[rows].to(device) if batch.old_logps is not None else logps.detach()
        out = self._policy_loss(logps, old, batch.advantages[rows].to(device), mask,
                                None if batch.ref_logps is None else batch.ref_logps[rows].to(device),
                                self._importance_weights(batch, rows, old, mask), mini.num_items, mini.num_micro_batches)
        stats = {
            "clip_ratio": out.clip_ratio.item(),  # the core averages over micro-batches and logs the loss
            "kl": out.kl.item() if out.kl is not None else 0.0,
            "entropy": ((entropy * mask).sum() / mask.sum().clamp(min=1)).item(),
        }
        return out.loss, stats
