"""PreftPPOConfig: TRL's PPOConfig field names where the meaning is the same, on the shared PreftRLConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ppo_core import KL_ESTIMATORS
from .rl_config import PreftRLConfig

KL_PENALTIES = ("reward", "loss")


@dataclass
class PreftPPOConfig(PreftRLConfig):
    output_dir: str = field(default="outputs/preft-ppo", metadata={"help": "Where checkpoints, logs and the final adapter go."})
    num_generations: int = field(default=1, metadata={"help": "Completions sampled per prompt (PPO needs no group)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (log-probs are taken after it)."})
    # --- PPO (TRL's names and defaults) ----------------------------------------------------------
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per pass; the rollout is per_device x accumulation x this."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL coefficient against the base model (adapter off); 0: no reference pass."})
    kl_estimator: str = field(default="k1", metadata={"help": f"KL estimator in the reward, one of {KL_ESTIMATORS}."})
    kl_penalty: str = field(default="reward", metadata={"help": "'reward': -kl_coef * KL in each token's reward (TRL); "
                                                               "'loss': kl_coef * k3 KL added to the policy loss (as GRPO)."})
    cliprange: float = field(default=0.2, metadata={"help": "Clipping range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clipping range of the value update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale the token rewards to unit variance (mean kept)."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten the advantages over the rollout's tokens (all processes)."})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Subtracted from the score of a completion cut at max_completion_length."})
    critic_warmup_steps: int = field(default=0, metadata={"help": "First steps that train only the critic (the policy loss is off)."})
    critic_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the critic adapter and value head (None: learning_rate)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        need = self._need
        need(self.num_ppo_epochs >= 1, f"num_ppo_epochs={self.num_ppo_epochs} must be >= 1")
        need(self.num_mini_batches >= 1, f"num_mini_batches={self.num_mini_batches} must be >= 1")
        need(self.kl_coef >= 0, f"kl_coef={self.kl_coef} must be >= 0")
        need(self.kl_estimator in KL_ESTIMATORS, f"kl_estimator={self.kl_estimator!r}: use one of {KL_ESTIMATORS}")
        need(self.kl_penalty in KL_PENALTIES, f"kl_penalty={self.kl_penalty!r}: use one of {KL_PENALTIES}")
        need(self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0")
        need(self.vf_coef > 0, f"vf_coef={self.vf_coef} must be > 0 (the critic would never learn)")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"gamma={self.gamma} and lam={self.lam} must be in [0, 1]")
        need(self.critic_warmup_steps >= 0, f"critic_warmup_steps={self.critic_warmup_steps} must be >= 0")
        need(self.critic_learning_rate is None or self.critic_learning_rate > 0, "critic_learning_rate must be > 0 (or None)")

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.num_ppo_epochs * self.num_mini_batches

    def generation_batch_size(self, num_processes: int) -> int:
        return super().generation_batch_size(num_processes) * self.num_mini_batches

    def describe(self, num_processes: int, max_steps: int | None = None) -> str:
        return f"{super().describe(num_processes, max_steps)}, {self.num_ppo_epochs} epoch(s) x {self.num_mini_batches} mini-batch(es) each"
