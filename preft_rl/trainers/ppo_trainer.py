"""PreftPPOTrainer: PPO on a prefill-only policy adapter with a critic on the same frozen base (core.py's hooks).

The critic is a second adapter on the one base model (an all-token LoRA by default, with its own rank) plus an
fp32 value head; there is no second copy of the base weights. Each `PreftModel` reads its own selection kwarg, so a
call through the critic runs with the policy adapter off and a call through the policy with the critic off, also
when gradient checkpointing re-runs a layer. The engine still receives only the policy adapter.

Per step: roll out -> old policy and reference log-probs, critic values -> token rewards (the score at the last
completion token, -kl_coef * KL at every token, TRL's convention; or the KL in the loss) -> GAE -> for
num_ppo_epochs x num_mini_batches optimizer steps: clipped policy loss + vf_coef * clipped value loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from preft_rl.adapters import PreftConfig, PreftModel, get_preft_model
from preft_rl.adapters.serialization import KEY_PREFIX

from . import ppo_core
from .core import MiniBatch, PreftRLTrainer
from .grpo_core import policy_loss
from .ppo_config import PreftPPOConfig
from .rollout import RolloutBatch


class ActorCritic(nn.Module):
    """The policy (prefill-only adapter, logits) and the critic (its own adapter + value head) over one base.

    One module, so accelerate / DeepSpeed see every trained parameter once and a training forward is one call."""

    def __init__(self, policy: PreftModel, critic: PreftModel, value_head: nn.Linear) -> None:
        super().__init__()
        self.policy, self.critic, self.value_head = policy, critic, value_head

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor, keep: int) -> torch.Tensor:
        """(b, keep) value estimates read at the last `keep` positions (the policy adapter is off here)."""
        hidden = self.critic.hidden_states(input_ids, attention_mask, prompt_mask)[:, -keep:]
        return self.value_head(hidden.float()).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor, logits_to_keep: int,
                with_values: bool = True, share_prompts: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, prompt_mask=prompt_mask, logits_to_keep=logits_to_keep,
                             share_prompts=share_prompts).logits
        values = self.values(input_ids, attention_mask, prompt_mask, logits_to_keep) if with_values else None
        return logits, values


class PreftPPOTrainer(PreftRLTrainer):
    config_class = PreftPPOConfig
    display_name = "PreFT PPO"
    share_stats = ("policy_loss", "value_loss")
    args: PreftPPOConfig

    def __init__(self, model: Any, reward_funcs: Any = None, args: PreftPPOConfig | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, preft_config: PreftConfig | None = None, critic_config: PreftConfig | None = None,
                 tenants: Any = None, tools: Any = None, environment_factory: Any = None) -> None:
        self._critic_config = critic_config
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, preft_config, tenants=tenants, tools=tools,
                         environment_factory=environment_factory)

    def _check_tools_supported(self, tools: Any, environment_factory: Any) -> None:
        if tools is not None or environment_factory is not None:
            raise ValueError("PreftPPOTrainer does not run tools yet: its critic would need values and GAE over trajectories "
                             "whose tool tokens the policy did not sample; use PreftGRPOTrainer(..., tools=[...]) for multi-turn "
                             "tool use")

    # ------------------------------------------------------------------------------ modules
    def _build_extra_modules(self, base: nn.Module) -> None:
        import dataclasses

        args = self.args
        config = (dataclasses.replace(self._critic_config) if self._critic_config is not None
                  else PreftConfig(method="lora", r=8, alpha=16, target_modules="all-linear", adapter_scope="all"))
        if config.seed is None:
            config.seed = args.seed + 1
        self.critic_config = config
        self.critic_model = get_preft_model(base, config)  # a second adapter on the same frozen base
        device = next(base.parameters()).device
        self.value_head = nn.Linear(base.config.hidden_size, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: a deterministic, neutral baseline
        nn.init.zeros_(self.value_head.bias)
        self.actor_critic = ActorCritic(self.preft_model, self.critic_model, self.value_head)

    def _trainable_module(self) -> nn.Module:
        return self.actor_critic

    def _critic_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.critic_model.adapter_named_parameters()] + list(self.value_head.parameters())

    def _optimizer_param_groups(self) -> list[dict[str, Any]]:
        critic = {"params": self._critic_parameters()}
        if self.args.critic_learning_rate is not None:
            critic["lr"] = self.args.critic_learning_rate
        return [*super()._optimizer_param_groups(), critic]

    def _checkpoint_state(self) -> dict[str, nn.Parameter]:
        state = {f"critic.{KEY_PREFIX}{name}": p for name, p in self.critic_model.adapter_named_parameters()}
        state.update({f"value_head.{name}": p for name, p in self.value_head.named_parameters()})
        return state

    def _policy_logits(self, ids: torch.Tensor, am: torch.Tensor, pm: torch.Tensor, keep: int) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=am, prompt_mask=pm, logits_to_keep=keep, with_values=False,
                          share_prompts=self.args.share_prompt_forward)[0]

    # ------------------------------------------------------------------------------ rollout
    def _needs_old_logps(self) -> bool:
        return True  # the ratio of every epoch, and the KL in the reward

    def _needs_ref_logps(self) -> bool:
        return self.args.kl_coef > 0

    @torch.no_grad()
    def _values_no_grad(self, batch: RolloutBatch) -> torch.Tensor:
        parts = []
        for rows in batch.micro_batches(self.args.per_device_train_batch_size):
            ids, am, pm, first = self._forward_inputs(batch, rows)
            values = torch.zeros(ids.shape, device=ids.device)
            values[:, first + 1 :] = self.actor_critic.values(ids, am, pm, ids.shape[1] - first)[:, :-1]
            parts.append(values.cpu())
        return torch.cat(parts)

    def _loss_mask(self, batch: RolloutBatch, rows: Any) -> torch.Tensor:
        # a completion no reward function could score teaches neither the policy nor the critic
        return batch.completion_mask[rows] & ~batch.rewards[rows].isnan()[:, None]

    def _compute_advantages(self, batch: RolloutBatch) -> None:
        args = self.args
        mask = self._loss_mask(batch, slice(None))
        scores = torch.nan_to_num(batch.rewards, nan=0.0)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * batch.truncated.float()
        batch.values = self._values_no_grad(batch)
        kl = torch.zeros_like(batch.values)
        if args.kl_coef > 0 and args.kl_penalty == "reward":
            kl = ppo_core.kl_per_token(batch.old_logps, batch.ref_logps, args.kl_estimator)
        rewards = ppo_core.token_rewards(scores, kl, mask, args.kl_coef)
        if args.whiten_rewards:
            rewards = ppo_core.whiten(rewards, mask, self._global_moments(rewards, mask), shift_mean=False)
        advantages, batch.returns = ppo_core.gae(rewards, batch.values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = ppo_core.whiten(advantages, mask, self._global_moments(advantages, mask))
        batch.advantages = advantages

    def _global_moments(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked count, sum and sum of squares over every process: whitening sees the whole rollout."""
        moments = ppo_core.masked_moments(values.double(), mask).to(self.accelerator.device)
        return self.accelerator.reduce(moments, reduction="sum").cpu()

    # ------------------------------------------------------------------------------ update
    def _mini_batches(self, batch: RolloutBatch) -> list[list[Any]]:
        """num_ppo_epochs passes, each a fresh permutation split into num_mini_batches optimizer steps; seeded by
        (seed, step) so a resumed run shuffles as an uninterrupted one."""
        args = self.args
        size = batch.input_ids.shape[0]
        per_mini = size // args.num_mini_batches
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + self.step)
        steps = []
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(size, generator=generator)
            for m in range(args.num_mini_batches):
                rows = order[m * per_mini : (m + 1) * per_mini]
                steps.append([rows[i : i + args.per_device_train_batch_size] for i in range(0, per_mini, args.per_device_train_batch_size)])
        return steps

    def _compute_loss(self, batch: RolloutBatch, rows: Any, mini: MiniBatch) -> tuple[torch.Tensor, dict[str, float]]:
        args, device = self.args, self.accelerator.device
        ids, am, pm, first = self._forward_inputs(batch, rows)
        keep = ids.shape[1] - first
        logits, value_tail = self.model(input_ids=ids, attention_mask=am, prompt_mask=pm, logits_to_keep=keep, with_values=True,
                                        share_prompts=self.args.share_prompt_forward)
        logps, entropy = self._token_logps(logits, ids, first, with_entropy=True)
        values = torch.zeros(ids.shape, dtype=value_tail.dtype, device=device)
        values[:, first + 1 :] = value_tail[:, :-1]
        mask = self._loss_mask(batch, rows).to(device).float()
        old = batch.old_logps[rows].to(device)
        kl_in_loss = args.kl_coef > 0 and args.kl_penalty == "loss"
        policy = policy_loss(
            logps, old, batch.advantages[rows].to(device), mask, loss_type="dapo", epsilon=args.cliprange,
            beta=args.kl_coef if kl_in_loss else 0.0, ref_logps=batch.ref_logps[rows].to(device) if kl_in_loss else None,
            is_weights=self._importance_weights(batch, rows, old, mask), num_items=mini.num_items,
            num_micro_batches=mini.num_micro_batches,
        )
        value = ppo_core.value_loss(values, batch.values[rows].to(device), batch.returns[rows].to(device), mask,
                                    args.cliprange_value, num_items=mini.num_items)
        policy_weight = 0.0 if self.step < args.critic_warmup_steps else 1.0  # warm-up: the critic learns alone
        # both terms are this micro-batch's share of the mini-batch's token mean (normalised by mini.num_items)
        loss = policy_weight * policy.loss + args.vf_coef * value.loss
        with torch.no_grad():
            ratio = torch.exp(logps - old)
            stats = {
                # shares of the mini-batch's terms (share_stats: the core scales them as the loss and logs 'loss')
                "policy_loss": policy.loss.item(), "value_loss": value.loss.item(),
                "clip_ratio": policy.clip_ratio.item(), "value_clip_ratio": value.clip_fraction.item(),
                "approx_kl": ppo_core.masked_mean(0.5 * (logps - old) ** 2, mask).item(),
                "ratio": ppo_core.masked_mean(ratio, mask).item(),
                "entropy": ppo_core.masked_mean(entropy, mask).item(),
                "values/mean": ppo_core.masked_mean(values, mask).item(),
                "returns/mean": ppo_core.masked_mean(batch.returns[rows].to(device), mask).item(),
            }
            if batch.ref_logps is not None:
                stats["kl"] = ppo_core.masked_mean(ppo_core.kl_per_token(logps, batch.ref_logps[rows].to(device), args.kl_estimator), mask).item()
        return loss, stats
