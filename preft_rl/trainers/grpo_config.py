"""PreftGRPOConfig: TRL's GRPOConfig field names where the meaning is the same, on the shared PreftRLConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import advantages as _advantages  # registers the estimators
from . import losses as _losses  # registers the losses
from .grpo_core import SCALE_REWARDS
from .rl_config import PreftRLConfig


@dataclass
class PreftGRPOConfig(PreftRLConfig):
    output_dir: str = field(default="outputs/preft-grpo", metadata={"help": "Where checkpoints, logs and the final adapter go."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the GRPO group size)."})
    num_iterations: int = field(default=1, metadata={"help": "Optimizer passes over each generated batch (mu)."})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient against the base model (adapter off); 0: no reference pass."})
    use_bias_correction_kl: bool = field(default=True, metadata={"help": "Multiply the k3 KL by pi_theta / pi_old (TRL's default)."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range of the ratio."})
    epsilon_high: float | None = field(default=None, metadata={
        "help": "Upper clipping range (default: epsilon; DAPO: 0.28); with loss_type='cispo' the cap of the ratio itself (5.0)."})
    loss_type: str = field(default="dapo", metadata={
        "help": f"A registered loss (preft_rl.trainers.losses.register_loss), built in: {sorted(_losses.LOSSES)}."})
    scale_rewards: str = field(default="group", metadata={"help": f"One of {SCALE_REWARDS}."})
    advantage_estimator: str = field(default="group", metadata={
        "help": "A registered advantage estimator (preft_rl.trainers.advantages.register_advantage), built in: "
                f"{sorted(_advantages.ADVANTAGE_ESTIMATORS)}."})

    min_generations = 2  # GRPO compares completions of one prompt

    def __post_init__(self) -> None:
        super().__post_init__()
        need = self._need
        need(self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1")
        need(self.loss_type in _losses.LOSSES, f"loss_type={self.loss_type!r} is not a registered loss: use one of "
             f"{sorted(_losses.LOSSES)}, or register it first with preft_rl.trainers.losses.register_loss")
        need(self.advantage_estimator in _advantages.ADVANTAGE_ESTIMATORS,
             f"advantage_estimator={self.advantage_estimator!r} is not registered: use one of "
             f"{sorted(_advantages.ADVANTAGE_ESTIMATORS)}, or register it first with "
             "preft_rl.trainers.advantages.register_advantage")
        if self.scale_rewards is True:
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"
        need(self.scale_rewards in SCALE_REWARDS, f"scale_rewards={self.scale_rewards!r}: use one of {SCALE_REWARDS}")
        need(self.beta >= 0, f"beta={self.beta} must be >= 0")

    @property
    def steps_per_generation(self) -> int:
        return self.num_iterations

    def describe(self, num_processes: int, max_steps: int | None = None) -> str:
        return f"{super().describe(num_processes, max_steps)}, {self.num_iterations} iteration(s) per batch"
