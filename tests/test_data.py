"""load_gsm8k: local jsonl (the real GSM8K here), offline generation, and clear errors."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA
from preft_rl.data import SYSTEM_PROMPT, load_gsm8k
from preft_rl.rewards import format_reward, gsm8k_accuracy_reward

GSM8K_DIR = SHARED_DATA / "gsm8k"


def test_local_jsonl_gives_chat_prompts_and_gold_answers():
    if not GSM8K_DIR.is_dir():
        pytest.skip("no shared GSM8K here")
    ds = load_gsm8k("test", source=GSM8K_DIR / "test.jsonl")
    assert len(ds) == 1319  # the GSM8K test split
    row = ds[0]
    assert row["prompt"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert row["prompt"][1]["role"] == "user" and row["prompt"][1]["content"] == row["question"].strip()
    assert "####" in row["answer"]
    train = load_gsm8k("train", source=GSM8K_DIR, num_examples=10, shuffle=True, seed=1)
    assert len(train) == 10 and train[0]["question"] != load_gsm8k("train", source=GSM8K_DIR, num_examples=1)[0]["question"]


def test_generated_problems_are_seeded_and_scorable():
    a = load_gsm8k("train", source="generated", num_examples=5, seed=3)
    b = load_gsm8k("train", source="generated", num_examples=5, seed=3)
    test = load_gsm8k("test", source="generated", num_examples=5, seed=3)
    assert a["question"] == b["question"] and a["question"] != test["question"]
    # reasoning-gym draws item i with seed + i, so naive seeds (train 6, test 7) shared all but one problem
    train_sets = [set(load_gsm8k("train", source="generated", num_examples=30, seed=s)["question"]) for s in (3, 4)]
    test_set = set(load_gsm8k("test", source="generated", num_examples=30, seed=3)["question"])
    assert not (train_sets[0] | train_sets[1]) & test_set and not train_sets[0] & train_sets[1]
    assert gsm8k_accuracy_reward(a["prompt"], a["answer"], answer=a["answer"]) == [1.0] * 5
    assert format_reward(a["prompt"], a["answer"]) == [1.0] * 5


def test_offline_auto_falls_back_and_errors_name_the_fix(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level("WARNING"):
        ds = load_gsm8k("train", num_examples=3)
    assert len(ds) == 3 and "offline gsm_symbolic" in caplog.text
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1; pass a local jsonl"):
        load_gsm8k("train", source="hub")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_gsm8k("train", source=tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 lacks 'question'"):
        load_gsm8k("train", source=tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="split='validation'"):
        load_gsm8k("validation")
