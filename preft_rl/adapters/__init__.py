"""Prefill-only LoRA / LoReFT / DiReFT on Hugging Face causal LMs (the reference path)."""

from .config import PreftConfig
from .masks import adapter_mask_from_spans, position_ids_from_attention_mask, prompt_mask_from_lengths
from .model import PreftModel, get_preft_model
from .tenants import TenantPreftModel

__all__ = ["PreftConfig", "PreftModel", "TenantPreftModel", "get_preft_model", "prompt_mask_from_lengths", "adapter_mask_from_spans",
           "position_ids_from_attention_mask"]
