"""Answer-style rewards: personal preferences a user can hold about how answers look, checkable without a model.

Each is a TRL-signature reward (1.0 when the completion has the style, else 0.0; malformed completions score 0.0)
and is registered by name in `REWARD_FUNCS` ('style_terse', ...), so a tenants file can name them. They are the
tenants' objectives in examples/grpo_multitenant.py: on the same neutral prompt each tenant's adapter learns its
own style. The base rates quoted are the offline default model's sampled answers (temperature 0.7) to chain_sum
questions under the example's neutral prompt, measured when the example was built.

>>> style_terse_reward(["q"] * 2, ["It is 15.", "To solve this we add 12 and 3, which gives 15."])
[1.0, 0.0]
"""

from __future__ import annotations

import re
from typing import Any

from .math import check_batch_columns, completion_text

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_IS = re.compile(r"\b(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*\**-?\d", re.IGNORECASE)
_EQUATION = re.compile(r"-?\d+(?:\s*[-+*/×x]\s*-?\d+)+\s*=\s*-?\d+")


def _texts(name: str, completions: list[Any]) -> list[str | None]:
    check_batch_columns(name, completions)
    return [completion_text(c) for c in completions]


def style_terse_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **_: Any) -> list[float]:
    """At most 8 words, one of them a number: 'It is 15.'"""
    return [float(t is not None and len(t.split()) <= 8 and bool(_NUMBER.search(t))) for t in _texts("style_terse_reward", completions)]


def style_explained_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **_: Any) -> list[float]:
    """At least 20 words of explanation, with a number in them."""
    return [float(t is not None and len(t.split()) >= 20 and bool(_NUMBER.search(t))) for t in _texts("style_explained_reward", completions)]


def style_number_first_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **_: Any) -> list[float]:
    """The answer opens with a number: '15. First ...'"""
    return [float(t is not None and bool(_NUMBER.match(t.strip().lstrip("*")))) for t in _texts("style_number_first_reward", completions)]


def style_answer_is_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **_: Any) -> list[float]:
    """States 'the answer is N' (or 'the final answer is N')."""
    return [float(t is not None and bool(_ANSWER_IS.search(t))) for t in _texts("style_answer_is_reward", completions)]


def style_equation_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **_: Any) -> list[float]:
    """Shows the arithmetic as an equation: '12 - 5 + 8 = 15'."""
    return [float(t is not None and bool(_EQUATION.search(t))) for t in _texts("style_equation_reward", completions)]


def style_paragraphs_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **_: Any) -> list[float]:
    """Lays the answer out in paragraphs: at least one blank line between two pieces of text."""
    return [float(t is not None and bool(re.search(r"\S\s*\n\s*\n\s*\S", t))) for t in _texts("style_paragraphs_reward", completions)]


def style_direct_reward(prompts: list[Any], completions: list[Any], completion_ids: Any = None, **_: Any) -> list[float]:
    """Gets to the point: does not open with a preamble ('To solve this ...', 'To find ...') and has a number."""
    return [float(t is not None and not re.match(r"\s*to\b", t, re.IGNORECASE) and bool(_NUMBER.search(t)))
            for t in _texts("style_direct_reward", completions)]


STYLE_REWARDS = {
    "style_terse": style_terse_reward,
    "style_explained": style_explained_reward,
    "style_number_first": style_number_first_reward,
    "style_answer_is": style_answer_is_reward,
    "style_equation": style_equation_reward,
    "style_paragraphs": style_paragraphs_reward,
    "style_direct": style_direct_reward,
}
