"""Datasets for RL fine-tuning: GSM8K from the hub, a local jsonl, or generated offline; reasoning-gym tasks;
a provider's tenants file."""

from .generated import load_generated_task
from .gsm8k import SYSTEM_PROMPT, load_gsm8k
from .tenants import TenantEntry, read_tenants_file, tenant_datasets

__all__ = ["SYSTEM_PROMPT", "TenantEntry", "load_generated_task", "load_gsm8k", "read_tenants_file", "tenant_datasets"]
