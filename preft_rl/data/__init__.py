"""Datasets for RL fine-tuning: GSM8K from the hub, a local jsonl, or generated offline; reasoning-gym tasks."""

from .generated import load_generated_task
from .gsm8k import SYSTEM_PROMPT, load_gsm8k

__all__ = ["SYSTEM_PROMPT", "load_generated_task", "load_gsm8k"]
