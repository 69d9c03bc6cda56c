"""Math rewards: real GSM8K answers, chat completions, threads, and errors that are counted, not zeroed."""

from __future__ import annotations

import doctest
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import preft_rl.rewards.math as math_rewards
from conftest import SHARED_DATA
from preft_rl.rewards import REWARD_FUNCS, format_reward, get_reward_func, gsm8k_accuracy_reward

GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"


def gsm8k_rows(n: int) -> list[dict]:
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"{GSM8K_TRAIN} is not here")
    with GSM8K_TRAIN.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_docstring_examples_hold():
    assert doctest.testmod(math_rewards).failed == 0


def test_reference_solutions_score_one_and_shifted_answers_zero():
    rows = gsm8k_rows(200)
    answers = [r["answer"] for r in rows]
    assert gsm8k_accuracy_reward([r["question"] for r in rows], answers, answer=answers) == [1.0] * 200
    wrong = [a.rsplit("####", 1)[0] + "#### " + str(int(a.rsplit("####", 1)[1].replace(",", "")) + 1) for a in answers]
    assert gsm8k_accuracy_reward([""] * 200, wrong, answer=answers) == [0.0] * 200
    assert format_reward([""] * 200, answers) == [1.0] * 200


def test_chat_completions_boxed_answers_and_garbage():
    chat = [[{"role": "assistant", "content": "Total: \\boxed{18}"}], [{"role": "assistant", "content": "I am not sure."}]]
    assert gsm8k_accuracy_reward(["q", "q"], chat, answer=["#### 18", "#### 18"]) == [1.0, 0.0]
    assert format_reward(["q", "q"], chat) == [0.0, 0.0]
    assert gsm8k_accuracy_reward(["q"], ["#### 0.5"], answer=["#### .5"]) == [1.0]


def test_scoring_in_worker_threads_works():
    rows = gsm8k_rows(32)
    answers = [r["answer"] for r in rows]
    chunks = [answers[i : i + 8] for i in range(0, 32, 8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: gsm8k_accuracy_reward([""] * len(c), c, answer=c), chunks))
    assert [x for r in results for x in r] == [1.0] * 32


def test_internal_errors_are_counted_and_never_zero():
    before = gsm8k_accuracy_reward.errors.count
    rewards = gsm8k_accuracy_reward(["q", "q"], ["#### 5", "#### 5"], answer=["#### 5", "no number here"])
    assert rewards == [1.0, None]
    assert gsm8k_accuracy_reward.errors.count == before + 1
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        gsm8k_accuracy_reward(["q", "q"], ["a", "b"], answer=["#### 1"])


def test_registry_by_name():
    assert get_reward_func("gsm8k_accuracy") is gsm8k_accuracy_reward
    assert set(REWARD_FUNCS) == {"gsm8k_accuracy", "gsm8k_last_number", "format"}
    with pytest.raises(ValueError, match="unknown reward 'acc'; available"):
        get_reward_func("acc")


def test_malformed_completions_and_answers():
    from preft_rl.rewards import gsm8k_last_number_reward

    completions = ["", "#### ", "\\boxed{", "#### twelve", "   ", "####\n12"]
    answers = ["#### 12"] * len(completions)
    assert gsm8k_accuracy_reward([""] * len(completions), completions, answer=answers) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward([""] * len(completions), completions) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert gsm8k_last_number_reward([""] * 3, ["", "no digits", "1,2,3 then 12."], answer=["#### 12"] * 3) == [0.0, 0.0, 1.0]
    with pytest.raises(TypeError, match="a completion must be a string or a list of chat messages"):
        gsm8k_accuracy_reward(["q"], [42], answer=["#### 42"])


# Completions a policy under RL can find that used to hang math-verify (its timeouts are off, issue 14),
# plus answers too large for exact arithmetic. Each must score 0.0 against "#### 72", quickly, in any thread.
HOSTILE = [
    "\\boxed{9^9^9^9}",
    "\\boxed{10^10^10}",
    "\\boxed{2**2**2**40}",
    "\\boxed{(10^9)!}",
    "\\boxed{99999999!}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{\\binom{10^{9}}{10^{6}}}",
    "\\boxed{1e999999999}",
    "#### 1e999999999",
    "#### " + "9" * 5000,
    "\\boxed{" + "9" * 5000 + "}",
    "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
]
_HOSTILE_SCRIPT = """
import json, sys, threading, time
from preft_rl.rewards import gsm8k_accuracy_reward, gsm8k_last_number_reward
completions = json.loads(sys.stdin.read())
results = {}
def score(where):
    for c in completions:
        start = time.perf_counter()
        r = (gsm8k_accuracy_reward(["q"], [c], answer=["#### 72"])[0], gsm8k_last_number_reward(["q"], [c], answer=["#### 72"])[0])
        results.setdefault(where, []).append([c[:40], r, time.perf_counter() - start])
score("main thread")
worker = threading.Thread(target=score, args=("worker thread",))
worker.start()
worker.join()
print("RESULT " + json.dumps(results))
"""


def test_hostile_answers_finish_quickly_in_the_main_and_worker_threads():
    import subprocess
    import sys

    try:  # a child process, so that a hang (inside C, holding the GIL) can be killed
        proc = subprocess.run([sys.executable, "-c", _HOSTILE_SCRIPT], input=json.dumps(HOSTILE), capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("scoring a hostile completion did not finish within 90 s")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stderr[-3000:]
    results = json.loads(line[0][len("RESULT "):])
    for where, rows in results.items():
        for text, rewards, seconds in rows:
            assert rewards[0] == 0.0, (where, text, rewards)
            assert rewards[1] in (0.0, None), (where, text, rewards)
            assert seconds < 2.0, (where, text, seconds)


@pytest.mark.parametrize(
    "completion,gold,expected",
    [("#### 1,250", "#### 1250", 1.0), ("#### .5", "#### 0.5", 1.0), ("\\boxed{72.00}", "#### 72", 1.0),
     ("\\boxed{-3}", "#### -3", 1.0), ("\\boxed{3/4}", "#### 0.75", 1.0), ("\\boxed{\\$72}", "#### 72", 1.0),
     ("\\boxed{2^3}", "#### 8", 1.0), ("\\boxed{2^3}", "#### 9", 0.0), ("\\boxed{72.5}", "#### 72", 0.0),
     ("\\boxed{10^30}", "#### 1000000000000000000000000000000", 1.0), ("\\boxed{2^3 * 9}", "#### 72", 1.0),
     ("#### 72", "#### 72.5", 0.0)],
)
def test_plain_and_small_symbolic_answers_still_score(completion, gold, expected):
    """The guard against hostile answers leaves ordinary ones alone (plain numbers exactly, small powers)."""
    assert gsm8k_accuracy_reward(["q"], [completion], answer=[gold]) == [expected]


@pytest.mark.parametrize("predicted,gold", [("\\frac{3}{4}", "0.75"), ("2^{3}", "8"), ("10^{30}", "1" + "0" * 30), ("8 \\cdot 9", "72")])
def test_braced_latex_answers_pass_the_guard(predicted, gold):
    # (\boxed{...} with nested braces is not extracted yet; the comparison itself accepts these forms)
    assert math_rewards.safe_for_math_verify(predicted)
    assert math_rewards._equal(gold, f"${predicted}$")  # math-verify reads LaTeX inside $...$
