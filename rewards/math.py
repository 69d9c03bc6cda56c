"""Math rewards with TRL's reward signature: `fn(prompts, completions, completion_ids=None, **columns)`.

Completions may be plain strings or chat messages (`[{"role": "assistant", "content": ...}]`).
math-verify is called with its timeouts off (`parsing_timeout=None`, `timeout_seconds=None`): its
signal-based timeouts raise outside the main thread, and a trainer may score in a worker thread.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

logger = logging.getLogger(__name__)

_HASHES = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_FINAL_LINE = re.compile(r"####\s*\$?\s*-?[\d,]*\.?\d+\s*\$?\s*$")


class RewardErrorCounter:
    """Counts internal errors of a reward function (thread-safe); a trainer logs it as a metric."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


def completion_text(completion: Any) -> str:
    """The text of a plain or chat-format completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def extract_final_answer(text: str) -> str | None:
    """The last '#### N' number, else the last \\boxed{...}; None when neither is present.

    >>> extract_final_answer("3 + 4 = 7\\n#### 7")
    '7'
    >>> extract_final_answer("so the answer is \\\\boxed{1,250}")
    '1,250'
    >>> extract_final_answer("no idea") is None
    True
    """
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1]
    boxed = _BOXED.findall(text)
    return boxed[-1] if boxed else None


def gsm8k_ground_truth(answer: str) -> str:
    """The number after '####' in a GSM8K answer field (the whole string if it has none)."""
    match = _HASHES.findall(answer)
    return match[-1] if match else answer.strip()


def _equal(gold: str, predicted: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [ExprExtractionConfig(), LatexExtractionConfig()]
    gold_parsed = parse(gold.replace(",", ""), extraction_config=config, parsing_timeout=None, raise_on_error=True)
    pred_parsed = parse(predicted.replace(",", ""), extraction_config=config, parsing_timeout=None, raise_on_error=True)
    if not gold_parsed:
        raise ValueError(f"cannot parse the ground truth {gold!r}")
    return bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)


def gsm8k_accuracy_reward(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, *, answer: list[str], **_: Any
) -> list[float | None]:
    """1.0 when the completion's final answer ('#### N' or \\boxed{N}) equals the GSM8K answer, else 0.0.

    Wrong or missing answers score 0.0. An internal error (e.g. an unparseable ground truth) is logged,
    counted in `gsm8k_accuracy_reward.errors.count`, and scored None (TRL: no reward), never 0.0.

    >>> gsm8k_accuracy_reward(["q", "q", "q"], ["... #### 72", "\\\\boxed{72.0}", "#### 71"], answer=["#### 72"] * 3)
    [1.0, 1.0, 0.0]
    >>> gsm8k_accuracy_reward(["q"], [[{"role": "assistant", "content": "It is 1,234.\\n#### 1,234"}]], answer=["x #### 1234"])
    [1.0]
    """
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        predicted = extract_final_answer(completion_text(completion))
        if predicted is None:
            rewards.append(0.0)
            continue
        try:
            rewards.append(1.0 if _equal(gsm8k_ground_truth(gold), predicted) else 0.0)
        except Exception:  # noqa: BLE001 - any failure inside math-verify is an error, not a wrong answer
            gsm8k_accuracy_reward.errors.add()
            logger.exception("gsm8k_accuracy_reward: could not score %r against %r", predicted, gold)
            rewards.append(None)
    return rewards


gsm8k_accuracy_reward.errors = RewardErrorCounter()


def format_reward(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, **_: Any) -> list[float]:
    """1.0 when the completion ends with a final-answer line '#### <number>', else 0.0.

    >>> format_reward(["q", "q"], ["2 + 2 = 4\\n#### 4", "the answer is 4"])
    [1.0, 0.0]
    """
    return [1.0 if _FINAL_LINE.search(completion_text(c).strip()) else 0.0 for c in completions]


def gsm8k_last_number_reward(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, *, answer: list[str], **_: Any
) -> list[float | None]:
    """Lenient accuracy: 1.0 when the last number anywhere in the completion equals the GSM8K answer.

    >>> gsm8k_last_number_reward(["q", "q"], ["so she has 72 clips", "72 or maybe 71"], answer=["#### 72", "#### 72"])
    [1.0, 0.0]
    """
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        numbers = _NUMBER.findall(completion_text(completion))
        if not numbers:
            rewards.append(0.0)
            continue
        try:
            rewards.append(1.0 if _equal(gsm8k_ground_truth(gold), numbers[-1].rstrip(".")) else 0.0)
        except Exception:  # noqa: BLE001 - counted and reported, never a silent zero
            gsm8k_accuracy_reward.errors.add()
            logger.exception("gsm8k_last_number_reward: could not score %r against %r", numbers[-1], gold)
            rewards.append(None)
    return rewards
