"""preft-rl: RL fine-tuning of prefill-only adapters.

The heavy parts (the vLLM engine, the trainers) are imported lazily, so `import preft_rl` stays cheap
and never imports vLLM.
"""

from .adapters import (
    PreftConfig,
    PreftModel,
    adapter_mask_from_spans,
    get_preft_model,
    position_ids_from_attention_mask,
    prompt_mask_from_lengths,
)
from .trainers import PreftGRPOConfig, PreftGRPOTrainer, PreftPPOConfig, PreftPPOTrainer, Tenant

__version__ = "0.1.0"

__all__ = [
    "PreftEngine",
    "PreftGRPOConfig",
    "PreftGRPOTrainer",
    "PreftPPOConfig",
    "PreftPPOTrainer",
    "PreftConfig",
    "PreftModel",
    "Tenant",
    "get_preft_model",
    "prompt_mask_from_lengths",
    "adapter_mask_from_spans",
    "position_ids_from_attention_mask",
]


def __getattr__(name: str):
    if name == "PreftEngine":  # imports vLLM: only on first use
        from .engine import PreftEngine

        return PreftEngine
    raise AttributeError(f"module 'preft_rl' has no attribute {name!r}")
