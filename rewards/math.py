"""Math rewards with TRL's reward signature: `fn(prompts, completions, completion_ids=None, **columns)`.

Completions may be plain strings or chat messages (`[{"role": "assistant", "content": ...}]`).

Scoring finishes in bounded time on any completion, in any thread (a policy under RL finds strings like
`\\boxed{9^9^9^9}`, whose exact value has hundreds of millions of digits). Plain numbers (GSM8K's answers)
are compared exactly with `fractions.Fraction`, never through math-verify. Anything else reaches
math-verify only if it is short and holds nothing whose value can explode: no factorials, no unknown
LaTeX commands or named functions, at most one power with a small integer exponent. Otherwise it scores
0.0 (a wrong answer). math-verify's own timeouts use signal.alarm, which works only in the main thread,
so they are on there as a second guard and off in worker threads, where the checks above are the guard.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

# A number after '####': "1,250", "-3", "2.5", ".5", or a simple fraction "84/2" (unambiguous, so matching is linear).
_HASH_NUMBER = r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+))?"
_HASHES = re.compile(r"####\s*\$?\s*(" + _HASH_NUMBER + ")")
_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_FINAL_LINE = re.compile(r"####\s*\$?\s*" + _HASH_NUMBER + r"\s*\$?\s*$")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")  # \frac{144}{2} -> 144/2
_TEXT = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox)\s*\{([^{}]*)\}")  # \text{ clips}: a unit, dropped
# Exact comparison of plain numbers: "72", "-1,250", ".5", "72.00", "3/4" (optionally in $...$ or \$).
_PLAIN = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:/(?:\d+\.?\d*|\.\d+))?$")
_MAX_ANSWER_CHARS = 200  # far above any GSM8K answer; bounds parsing and digits
_MAX_RESULT_DIGITS = 4000  # a power may not produce more (below Python's int-to-str limit of 4300)
_SAFE_LATEX = {"frac", "dfrac", "tfrac", "text", "textbf", "textrm", "mathrm", "mathbf", "left", "right", "cdot",
               "times", "div", "sqrt", "pm", "approx", "quad", "qquad"}
_LATEX_COMMAND = re.compile(r"\\([A-Za-z]+)")
_POWER = re.compile(r"\^|\*\*")
_EXPONENT = re.compile(r"\s*(?:\{\s*([+-]?\d+)\s*\}|([+-]?\d+))")
_MATH_VERIFY_TIMEOUT_S = 5


class RewardErrorCounter:
    """Counts internal errors of a reward function (thread-safe); a trainer logs it as a metric."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


def completion_text(completion: Any) -> str | None:
    """The text of a plain or chat-format completion (the last message's content); None for anything else.

    A multi-turn completion (assistant and tool messages) answers in its last message only if the policy wrote it: one
    that ends with a tool result (cut off after a tool call) holds no answer of its own, so it gives "" (a tool's output,
    such as a calculator's number, never scores as the policy's answer).

    A malformed completion (None, an empty chat list, a dict, a message without text content) holds no answer:
    the rewards here score it 0.0, like a completion with no final answer, and never raise (a policy's output
    must not stop a training run). The first one is logged as a warning.

    >>> completion_text([{"role": "assistant", "content": "#### 4"}]), completion_text([]), completion_text(None)
    ('#### 4', None, None)
    >>> completion_text([{"role": "assistant", "content": "<tool_call>...</tool_call>"}, {"role": "tool", "content": "4"}])
    ''
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        if completion[-1].get("role", "assistant") == "tool":
            return ""
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    global _warned_malformed
    if not _warned_malformed:
        _warned_malformed = True
        logger.warning(
            "a completion is neither a string nor chat messages ending in one with text content (got %s); "
            "it is scored 0.0 (this is logged once)", repr(completion)[:200]
        )
    return None


_warned_malformed = False


def _boxed_answers(text: str) -> Iterator[str]:
    """The contents of each \\boxed{...} whose braces balance within _MAX_ANSWER_CHARS, last first (lazily),
    so the scan is bounded by that limit per \\boxed, however the braces nest or fail to close."""
    starts = [m.end() for m in _BOXED_OPEN.finditer(text)]
    for start in reversed(starts):
        depth, i, end = 1, start, min(len(text), start + _MAX_ANSWER_CHARS + 1)
        while i < end:
            char = text[i]
            if char == "\\":
                i += 2  # an escaped character (\{ is a literal brace, not a group)
                continue
            depth += (char == "{") - (char == "}")
            if depth == 0:
                yield text[start:i]
                break
            i += 1


def extract_final_answer(text: str) -> str | None:
    """The last '#### N' number (or fraction), else the last \\boxed{...} (braces may nest); None when neither
    is present.

    >>> extract_final_answer("3 + 4 = 7\\n#### 7")
    '7'
    >>> extract_final_answer("half of 84 is\\n#### 84 / 2")
    '84/2'
    >>> extract_final_answer("so the answer is \\\\boxed{\\\\frac{144}{2}}")
    '\\\\frac{144}{2}'
    >>> extract_final_answer("no idea") is None
    True
    """
    hashes = _HASHES.findall(text)
    if hashes:
        return re.sub(r"\s+", "", hashes[-1])
    return next(_boxed_answers(text), None)


def gsm8k_ground_truth(answer: str | int | float) -> str:
    """The number after '####' in a GSM8K answer field (the whole string if it has none); a number as its text."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    match = _HASHES.findall(answer)
    return re.sub(r"\s+", "", match[-1]) if match else answer.strip()


def plain_number(text: str) -> Fraction | None:
    """The exact value of a plain number ('1,250', '1{,}250', '-.5', '72.00', '3/4', '\\frac{3}{4}', '$72',
    '72 \\text{ clips}'); None for anything else.

    >>> plain_number("1,250"), plain_number("\\\\$0.50"), plain_number("3/4"), plain_number("2^3")
    (Fraction(1250, 1), Fraction(1, 2), Fraction(3, 4), None)
    >>> plain_number("-\\\\dfrac{144}{2}"), plain_number("72 \\\\text{ clips}"), plain_number("\\\\text{72}")
    (Fraction(-72, 1), Fraction(72, 1), Fraction(72, 1))
    """
    if len(text) > _MAX_ANSWER_CHARS:
        return None
    s = _TEXT.sub(lambda m: m.group(1) if any(c.isdigit() for c in m.group(1)) else "", text)  # units go, numbers stay
    s = _FRAC.sub(r"\1/\2", s).replace("{,}", "").replace(",", "").replace("\\$", "").strip().strip("$ ")
    if len(s) > _MAX_ANSWER_CHARS or not _PLAIN.match(s):
        return None
    numerator, _, denominator = s.partition("/")
    if denominator and Fraction(denominator) == 0:
        return None
    return Fraction(numerator) / Fraction(denominator) if denominator else Fraction(numerator)


def safe_for_math_verify(text: str) -> bool:
    """Whether math-verify can evaluate `text` in bounded time: short, no factorial, no unknown LaTeX
    command or named function, no scientific notation, and at most one power whose exponent is a small
    integer literal (so its value has at most a few thousand digits).

    >>> [safe_for_math_verify(t) for t in ("\\\\frac{144}{2}", "2^3 \\\\cdot 9", "9^9^9^9", "(10^9)!", "\\\\binom{9}{2}")]
    [True, True, False, False, False]
    """
    if len(text) > _MAX_ANSWER_CHARS:
        return False
    if re.search(r"(?<!\\)!", text) or re.search(r"\d\s*[eE]\s*[+-]?\d", text) or re.search(r"[A-Za-z]{2,}\s*\(", text):
        return False
    if any(command not in _SAFE_LATEX for command in _LATEX_COMMAND.findall(text)):
        return False
    powers = list(_POWER.finditer(text))
    if len(powers) > 1:
        return False
    for power in powers:
        exponent = _EXPONENT.match(text, power.end())
        if exponent is None:
            return False  # a symbolic or nested exponent
        value = int(exponent.group(1) or exponent.group(2))
        digits = sum(c.isdigit() for c in text)  # bounds the base's magnitude
        if abs(value) * (digits + 1) > _MAX_RESULT_DIGITS:
            return False
    return True


def _math_verify_equal(gold: str, predicted: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # signal-based timeouts: only possible in the main thread
    limit = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    config = [ExprExtractionConfig(), LatexExtractionConfig()]
    gold_parsed = parse(gold.replace(",", ""), extraction_config=config, parsing_timeout=limit, raise_on_error=True)
    if not gold_parsed:
        raise ValueError(f"cannot parse the ground truth {gold!r}")
    pred_parsed = parse(predicted.replace(",", ""), extraction_config=config, parsing_timeout=limit, raise_on_error=True)
    return bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=limit, raise_on_error=True)


def _equal(gold: str, predicted: str) -> bool:
    gold_value, predicted_value = plain_number(gold), plain_number(predicted)
    if gold_value is not None and predicted_value is not None:
        return gold_value == predicted_value  # exact, and no math-verify: the common case
    if not safe_for_math_verify(gold):
        raise ValueError(f"the ground truth {gold[:100]!r} is not a number this reward can score")
    if not safe_for_math_verify(predicted):
        return False  # a value that could take unbounded time to compute is not a GSM8K answer
    from math_verify.errors import TimeoutException

    try:
        return _math_verify_equal(gold, predicted)
    except TimeoutException:  # a BaseException: not caught by the callers' `except Exception`
        logger.warning("math-verify timed out comparing %r with %r; scored as wrong", predicted[:100], gold[:100])
        return False


def _is_batch(value: Any) -> bool:
    """A list, tuple or dataset column: sized and iterable, and not a string or a mapping (read per character / key)."""
    return hasattr(value, "__len__") and hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))


def check_batch_columns(name: str, completions: Any, *answers: Any) -> None:
    """The batch as TRL passes it: one completion (and one answer) per row, in lists (or dataset columns). A bare
    string is refused: it would be read one character per row. (Malformed *elements* are scored, never refused: see
    completion_text.)"""
    if not _is_batch(completions):
        raise TypeError(f"{name}: completions must be a list with one completion per row, got {type(completions).__name__}")
    for answer in answers:
        if not _is_batch(answer):
            raise TypeError(f"{name}: answer must be a list with one answer per row (the dataset's 'answer' column), "
                            f"got {type(answer).__name__} {answer!r:.60}")
        if len(answer) != len(completions):
            raise ValueError(f"{name}: got {len(completions)} completions but {len(answer)} answers; pass one answer "
                             "per completion (repeat each prompt's answer for each of its completions)")


def gsm8k_accuracy_reward(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, *, answer: list[str], **_: Any
) -> list[float | None]:
    """1.0 when the completion's final answer ('#### N' or \\boxed{N}) equals the GSM8K answer, else 0.0.

    Wrong or missing answers, and completions that are not text (see `completion_text`), score 0.0. An internal error (e.g. an unparseable ground truth) is logged,
    counted in `gsm8k_accuracy_reward.errors.count`, and scored None (TRL: no reward), never 0.0.

    >>> gsm8k_accuracy_reward(["q", "q", "q"], ["... #### 72", "\\\\boxed{72.0}", "#### 71"], answer=["#### 72"] * 3)
    [1.0, 1.0, 0.0]
    >>> gsm8k_accuracy_reward(["q"], [[{"role": "assistant", "content": "It is 1,234.\\n#### 1,234"}]], answer=["x #### 1234"])
    [1.0]
    """
    check_batch_columns("gsm8k_accuracy_reward", completions, answer)
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        text = completion_text(completion)
        predicted = extract_final_answer(text) if text is not None else None
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
    check_batch_columns("format_reward", completions)
    texts = [completion_text(c) for c in completions]
    return [1.0 if text is not None and _FINAL_LINE.search(text.strip()) else 0.0 for text in texts]


def gsm8k_last_number_reward(
    prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None, *, answer: list[str], **_: Any
) -> list[float | None]:
    """Lenient accuracy: 1.0 when the last number anywhere in the completion equals the GSM8K answer.

    >>> gsm8k_last_number_reward(["q", "q"], ["so she has 72 clips", "72 or maybe 71"], answer=["#### 72", "#### 72"])
    [1.0, 0.0]
    """
    check_batch_columns("gsm8k_last_number_reward", completions, answer)
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        text = completion_text(completion)
        numbers = _NUMBER.findall(text) if text is not None else []
        if not numbers:
            rewards.append(0.0)
            continue
        try:
            rewards.append(1.0 if _equal(gsm8k_ground_truth(gold), numbers[-1].rstrip(".")) else 0.0)
        except Exception:  # noqa: BLE001 - counted and reported, never a silent zero
            gsm8k_last_number_reward.errors.add()
            logger.exception("gsm8k_last_number_reward: could not score %r against %r", numbers[-1], gold)
            rewards.append(None)
    return rewards


gsm8k_last_number_reward.errors = RewardErrorCounter()
