"""Reward functions with TRL's signature, installed as `preft_rl.rewards` (see pyproject.toml).

The math rewards arrive with the GRPO work item.
"""
