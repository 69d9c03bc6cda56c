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
