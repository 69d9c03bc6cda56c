"""Reward functions with TRL's signature, installed as `preft_rl.rewards` (see pyproject.toml).

`REWARD_FUNCS` maps the names the CLI and configs use to the functions.
"""

from .math import extract_final_answer, format_reward, gsm8k_accuracy_reward, gsm8k_last_number_reward
from .style import STYLE_REWARDS

REWARD_FUNCS = {"gsm8k_accuracy": gsm8k_accuracy_reward, "gsm8k_last_number": gsm8k_last_number_reward, "format": format_reward,
                **STYLE_REWARDS}


def get_reward_func(name: str):
    """A reward function by name, e.g. 'gsm8k_accuracy'."""
    if name not in REWARD_FUNCS:
        raise ValueError(f"unknown reward {name!r}; available: {sorted(REWARD_FUNCS)}")
    return REWARD_FUNCS[name]


__all__ = [
    "REWARD_FUNCS",
    "STYLE_REWARDS",
    "extract_final_answer",
    "format_reward",
    "get_reward_func",
    "gsm8k_accuracy_reward",
    "gsm8k_last_number_reward",
]
