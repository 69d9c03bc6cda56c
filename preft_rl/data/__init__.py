"""Datasets for RL fine-tuning: GSM8K from the hub, a local jsonl, or generated offline."""

from .gsm8k import SYSTEM_PROMPT, load_gsm8k

__all__ = ["SYSTEM_PROMPT", "load_gsm8k"]
