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
    result = doctest.testmod(math_rewards)
    assert result.attempted >= 10 and result.failed == 0, result  # a runner that finds no examples must fail


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
    from preft_rl.rewards import STYLE_REWARDS

    assert set(REWARD_FUNCS) == {"gsm8k_accuracy", "gsm8k_last_number", "format", *STYLE_REWARDS}
    assert all(name.startswith("style_") for name in STYLE_REWARDS) and len(STYLE_REWARDS) == 7
    with pytest.raises(ValueError, match="unknown reward 'acc'; available"):
        get_reward_func("acc")


def test_malformed_completions_and_answers():
    from preft_rl.rewards import gsm8k_last_number_reward

    completions = ["", "#### ", "\\boxed{", "#### twelve", "   ", "####\n12"]
    answers = ["#### 12"] * len(completions)
    assert gsm8k_accuracy_reward([""] * len(completions), completions, answer=answers) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward([""] * len(completions), completions) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert gsm8k_last_number_reward([""] * 3, ["", "no digits", "1,2,3 then 12."], answer=["#### 12"] * 3) == [0.0, 0.0, 1.0]
    assert gsm8k_accuracy_reward(["q"], [42], answer=["#### 42"]) == [0.0]  # not text: no answer (see below)


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
            assert seconds < 10.0, (where, text, seconds)  # a hang guard (they used to never finish), not a speed goal


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
    # the comparison accepts these forms (\boxed{...} with nested braces reaches it: see GSM8K_STYLE below)
    assert math_rewards.safe_for_math_verify(predicted)
    assert math_rewards._equal(gold, f"${predicted}$")  # math-verify reads LaTeX inside $...$


# Hand-labelled GSM8K-style completions: (completion, gold answer field, strict score, format score).
# strict = gsm8k_accuracy_reward: the last '#### N', else the last \boxed{...} (balanced braces), equals the gold number.
# format = format_reward: the completion ends with a line '#### <number>' (optional $, commas, a decimal or a fraction).
GSM8K_STYLE = [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", 1.0, 1.0),
    ("The total is 1,250 dollars.\n#### 1,250", "#### 1250", 1.0, 1.0),  # commas
    ("#### 5,000,000", "#### 5000000", 1.0, 1.0),
    ("She pays $1,250 in all.\n#### $1,250", "#### 1250", 1.0, 1.0),  # dollars
    ("#### $72$", "#### 72", 1.0, 1.0),
    ("She pays 18 dollars.\n#### 18.00", "#### 18", 1.0, 1.0),  # decimals
    ("He has 2.5 hours left.\n#### 2.5", "#### 2.5", 1.0, 1.0),
    ("#### .5", "#### 0.5", 1.0, 1.0),
    ("#### 72.5", "#### 72", 0.0, 1.0),
    ("The temperature drops to -3 degrees.\n#### -3", "#### -3", 1.0, 1.0),  # negative numbers
    ("#### -3", "#### 3", 0.0, 1.0),
    ("#### 72\nI hope this helps!", "#### 72", 1.0, 0.0),  # trailing text after the answer
    ("#### 72\n", "#### 72", 1.0, 1.0),
    ("#### 70\nWait, 48 + 24 is 72.\n#### 72", "#### 72", 1.0, 1.0),  # several '####' lines: the last wins
    ("#### 72\nActually, I forgot the tax.\n#### 70", "#### 72", 0.0, 1.0),
    ("#### 72\nAs a check: \\boxed{70}", "#### 72", 1.0, 0.0),  # '####' wins over \boxed
    ("#### 84/2", "#### 42", 1.0, 1.0),  # a fraction after ####
    ("#### 84 / 2", "#### 42", 1.0, 1.0),
    ("#### 3/4", "#### 0.75", 1.0, 1.0),
    ("So the answer is \\boxed{72}.", "#### 72", 1.0, 0.0),
    ("I first thought \\boxed{70}, but it is \\boxed{72}.", "#### 72", 1.0, 0.0),  # the last \boxed wins
    ("\\boxed{\\frac{144}{2}}", "#### 72", 1.0, 0.0),  # nested braces
    ("The answer is $\\boxed{\\dfrac{144}{2}}$.", "#### 72", 1.0, 0.0),  # \dfrac
    ("\\boxed{\\frac{3}{4}}", "#### 0.75", 1.0, 0.0),
    ("\\boxed{-\\frac{1}{2}}", "#### -0.5", 1.0, 0.0),
    ("\\boxed{\\frac{144}{2}} clips\n#### 72", "#### 72", 1.0, 1.0),
    ("The answer is \\boxed{1{,}250}.", "#### 1250", 1.0, 0.0),  # LaTeX thousands separator
    ("\\boxed{\\$18.00}", "#### 18", 1.0, 0.0),
    ("\\boxed{25\\%}", "#### 25", 1.0, 0.0),  # percent: GSM8K's gold is the number of percent
    ("#### 25%", "#### 25", 1.0, 0.0),
    ("\\boxed{72 \\text{ clips}}", "#### 72", 1.0, 0.0),  # units
    ("#### 18 dollars", "#### 18", 1.0, 0.0),
    ("She sold 72 clips altogether.", "#### 72", 0.0, 0.0),  # the answer only in prose
    ("The answer is 72.", "#### 72", 0.0, 0.0),
    ("48 + 24 = 71\n#### 71", "#### 72", 0.0, 1.0),  # a wrong answer
    ("\\boxed{\\frac{144}{3}}", "#### 72", 0.0, 0.0),
    ("", "#### 72", 0.0, 0.0),  # empty
    ("####", "#### 72", 0.0, 0.0),
    ("\\boxed{}", "#### 72", 0.0, 0.0),
    ("\\boxed{\\frac{144}{2}", "#### 72", 0.0, 0.0),  # unbalanced braces: no answer
    ("#### seventy-two", "#### 72", 0.0, 0.0),
]


@pytest.mark.parametrize("completion,gold,strict,format_score", GSM8K_STYLE, ids=[repr(r[0][-30:]) for r in GSM8K_STYLE])
def test_hand_labelled_gsm8k_style_completions(completion, gold, strict, format_score):
    assert gsm8k_accuracy_reward(["q"], [completion], answer=[gold]) == [strict]
    assert format_reward(["q"], [completion]) == [format_score]


MALFORMED = [None, [], {}, {"role": "assistant", "content": "#### 72"}, 42, [{"role": "assistant"}],
             [{"role": "assistant", "content": None}], ["#### 72"], [None]]


def test_malformed_completions_score_zero_and_never_raise():
    """A completion that is not text (or chat messages with text) holds no answer: 0.0, not an error."""
    from preft_rl.rewards import gsm8k_last_number_reward

    n, before = len(MALFORMED), gsm8k_accuracy_reward.errors.count
    answers = ["#### 72"] * n
    assert gsm8k_accuracy_reward(["q"] * n, MALFORMED, answer=answers) == [0.0] * n
    assert gsm8k_last_number_reward(["q"] * n, MALFORMED, answer=answers) == [0.0] * n
    assert format_reward(["q"] * n, MALFORMED) == [0.0] * n
    assert gsm8k_accuracy_reward.errors.count == before  # a wrong output, not an internal error
    # the good completion next to them is still scored
    chat = [{"role": "assistant", "content": "#### 72"}]
    assert gsm8k_accuracy_reward(["q"] * 2, [None, chat], answer=answers[:2]) == [0.0, 1.0]
