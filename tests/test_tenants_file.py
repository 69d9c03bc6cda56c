"""A provider's tenants file (preft_rl/data/tenants.py) and the answer-style rewards the example's tenants use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preft_rl.data import read_tenants_file, tenant_datasets
from preft_rl.rewards import REWARD_FUNCS, STYLE_REWARDS

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_the_example_tenants_files_agree_and_name_known_rewards():
    jsonl = read_tenants_file(REPO / "examples" / "tenants" / "styles.jsonl")
    yaml = read_tenants_file(REPO / "examples" / "tenants" / "styles.yaml")
    assert jsonl == yaml and len(jsonl) >= 8
    assert len({tuple(e.rewards) for e in jsonl}) == len(jsonl)  # every tenant has its own objective


def test_file_entries_are_checked_and_errors_name_the_line_and_field(tmp_path):
    rows = write(tmp_path / "rows.jsonl", [{"question": f"what is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(6)])
    good = {"name": "ann", "rewards": ["style_terse", "gsm8k_last_number"], "data": rows.name, "reward_weights": [1, 0.5],
            "learning_rate": 1e-3}
    path = write(tmp_path / "t.jsonl", ["# a comment", json.dumps(good), "", json.dumps({"name": "ben", "rewards": "style_direct", "data": "chain_sum"})])
    ann, ben = read_tenants_file(path)
    assert ann.data == str(rows) and ann.reward_weights == [1.0, 0.5] and ann.learning_rate == 1e-3
    assert ben.rewards == ["style_direct"] and ben.data == "chain_sum" and ben.learning_rate is None
    train, held = tenant_datasets(ann, system_prompt="Be brief.", num_eval=2)
    assert len(train) == 4 and len(held) == 2 and held[1]["question"] == "what is 5 + 1?"
    assert train[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 0 + 1?"}]

    cases = [
        ({**good, "rewards": ["style_tersee"]}, "line 1: unknown reward(s) ['style_tersee']"),
        ({**good, "lr": 1}, "line 1: unknown field(s) ['lr']"),
        ({k: v for k, v in good.items() if k != "data"}, "line 1: 'data' is missing"),
        ({**good, "data": "nowhere.jsonl"}, "data file"),
        ({**good, "reward_weights": [1.0]}, "reward_weights=[1.0] must be 2 finite number(s)"),
        ({**good, "learning_rate": -1}, "learning_rate=-1 must be a number > 0"),
        ({**good, "name": "a b"}, "a b"),
    ]
    for entry, message in cases:
        with pytest.raises(ValueError, ) as err:
            read_tenants_file(write(tmp_path / "bad.jsonl", [entry]))
        assert message in str(err.value), (message, str(err.value))
    with pytest.raises(ValueError, match="line 2: not JSON"):
        read_tenants_file(write(tmp_path / "bad.jsonl", [good, "{oops"]))
    with pytest.raises(ValueError, match=r"tenant names \[.ann.\] appear more than once"):
        read_tenants_file(write(tmp_path / "bad.jsonl", [good, good]))
    (tmp_path / "bad.yaml").write_text("name: ann\n")
    with pytest.raises(ValueError, match="expected a YAML list of tenants"):
        read_tenants_file(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="must end in .jsonl, .yaml or .yml"):
        read_tenants_file(write(tmp_path / "t.txt", [good]))
    with pytest.raises(ValueError, match="not enough to hold out 48"):
        tenant_datasets(ann)


def test_a_tenant_may_train_on_its_recorded_traffic_instead_of_data(tmp_path):
    from preft_rl.traffic import SqliteTrafficStore

    SqliteTrafficStore(tmp_path / "traffic").close()
    held = write(tmp_path / "held.jsonl", [{"question": f"what is {i} + 2?"} for i in range(3)])
    entries = [{"name": "ann", "rewards": ["style_terse"], "traffic": "traffic", "eval_data": held.name},
               {"name": "ben", "rewards": ["style_terse"], "traffic": "traffic"}]
    ann, ben = read_tenants_file(write(tmp_path / "t.jsonl", entries))
    assert ann.traffic == ben.traffic == str(tmp_path / "traffic") and ann.data is None
    train, held_out = tenant_datasets(ann, system_prompt="Be brief.", num_eval=2)
    assert train is None and held_out["prompt"][1][-1]["content"] == "what is 1 + 2?"
    assert tenant_datasets(ben) == (None, None)  # not evaluated: no held-out rows
    cases = [
        ({**entries[0], "data": "chain_sum"}, "line 1: give data or traffic, not both"),
        ({**entries[0], "traffic": "elsewhere"}, "traffic folder " + str(tmp_path / "elsewhere") + " holds no traffic.sqlite"),
        ({**entries[0], "traffic": 3}, "traffic=3 must be the path"),
        ({"name": "cy", "rewards": ["style_terse"]}, "'data' is missing (or 'traffic'"),
    ]
    for entry, message in cases:
        with pytest.raises(ValueError) as err:
            read_tenants_file(write(tmp_path / "bad.jsonl", [entry]))
        assert message in str(err.value), (message, str(err.value))


def test_style_rewards_score_their_style_and_nothing_else():
    texts = {
        "It is 15.": {"style_terse", "style_direct"},
        "15. First add 12 and 3.": {"style_terse", "style_number_first", "style_direct"},
        "The answer is 15.": {"style_terse", "style_answer_is", "style_direct"},
        "12 + 3 = 15": {"style_terse", "style_equation", "style_number_first", "style_direct"},
        "To solve this we add twelve and three, which gives us fifteen.\n\nSo the total that we end up with is 15 in all.":
            {"style_explained", "style_paragraphs"},
        "To solve it, add them.": set(),
    }
    for text, styles in texts.items():
        got = {name for name, func in STYLE_REWARDS.items() if func(["q"], [text])[0] == 1.0}
        assert got == styles, (text, got)
        chat = {name for name, func in STYLE_REWARDS.items() if func(["q"], [[{"role": "assistant", "content": text}]])[0] == 1.0}
        assert chat == styles
    assert all(REWARD_FUNCS[name] is func for name, func in STYLE_REWARDS.items())
    assert all(func(["q"], [None]) == [0.0] for func in STYLE_REWARDS.values())  # malformed: 0.0, never an error
