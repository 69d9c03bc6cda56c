"""preft-rl: RL fine-tuning of prefill-only adapters.

The heavy parts (the vLLM engine, the trainers) are imported lazily, so `import preft_rl` stays cheap
and never imports vLLM.
"""

from .adapters import PreftConfig, PreftModel, get_preft_model, position_ids_from_attention_mask, prompt_mask_from_lengths

__version__ = "0.1.0"

__all__ = [
    "PreftConfig",
    "PreftModel",
    "get_preft_model",
    "prompt_mask_from_lengths",
    "position_ids_from_attention_mask",
]
