"""RL trainers for prefill-only adapters (GRPO; PPO follows)."""

from .grpo_config import PreftGRPOConfig
from .grpo_trainer import PreftGRPOTrainer

__all__ = ["PreftGRPOConfig", "PreftGRPOTrainer"]
