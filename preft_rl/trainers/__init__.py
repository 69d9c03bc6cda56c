"""RL trainers for prefill-only adapters: GRPO and PPO on one shared core (core.py)."""

from .core import PreftRLTrainer
from .grpo_config import PreftGRPOConfig
from .grpo_trainer import PreftGRPOTrainer
from .multitenant import Tenant
from .ppo_config import PreftPPOConfig
from .ppo_trainer import PreftPPOTrainer
from .rl_config import PreftRLConfig

__all__ = ["Tenant", "PreftGRPOConfig", "PreftGRPOTrainer", "PreftPPOConfig", "PreftPPOTrainer", "PreftRLConfig", "PreftRLTrainer"]
