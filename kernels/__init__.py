"""Triton kernels for multi-adapter prefill-only LoRA / ReFT with pure-torch references.

Installed as `preft_rl.kernels` (see pyproject.toml); the ops arrive with the kernels work item.
"""
