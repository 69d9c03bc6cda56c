"""The online loop (issue 33, item 5): rounds train the tenants with enough new traffic, each record once; a rebuilt
loop resumes from the checkpoint and trains nothing twice and loses nothing; a tenant whose round fails is isolated
and the others go on. Tiny Llama, fp32, CPU; no server (pushes are tested in test_serve / the example)."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from preft_rl import PreftConfig, PreftGRPOTrainer, Tenant
from preft_rl.traffic import SqliteTrafficStore, TrafficRecord
from preft_rl.traffic.online import OnlineConfig, OnlineLoop
from test_multitenant import PREFT, even_tokens
from test_traffic_training import config, round_data

pytest.importorskip("vllm")

SEEN: Counter = Counter()  # (tenant, prompt ids) -> completions scored


def tracked(name):
    def reward(prompts, completions, completion_ids=None, **_):
        if name == "carol":
            raise RuntimeError("carol's reward service is down")
        SEEN.update((name, str(p["prompt_token_ids"])) for p in prompts)
        return even_tokens(prompts, completions, completion_ids)

    reward.__name__ = f"{name}_reward"
    return reward


def add(store, tenant, start, count):
    for i in range(start, start + count):
        store.append(TrafficRecord(id=f"cmpl-{tenant}-{i}", choice=0, tenant=tenant, time=time.time(), adapter=tenant,
                                   version=1, prompt_ids=[1, 100 + i, 7 + len(tenant)], completion_ids=[5, 6],
                                   logprobs=[-1.0, -1.0], finish_reason="length")).result(timeout=30)


def loop(tiny_llama_dir, out, store, names):
    trainer = PreftGRPOTrainer(str(tiny_llama_dir), args=config(out, lr_scheduler_type="constant"),
                               preft_config=PreftConfig(**PREFT),
                               tenants=[Tenant(name, round_data(name, 0, rows=1), [tracked(name)]) for name in names])
    return OnlineLoop(trainer, store, OnlineConfig(min_new=4, interval_s=0))


@pytest.mark.slow
def test_the_loop_trains_each_record_once_across_rounds_restarts_and_failures(tiny_llama_dir, tmp_path):
    SEEN.clear()
    store = SqliteTrafficStore(tmp_path / "traffic")
    add(store, "alice", 0, 8)
    add(store, "bob", 0, 2)
    first = loop(tiny_llama_dir, tmp_path / "run", store, ["alice", "bob", "carol"])
    assert first.step_round()["tenants"] == ["alice"]  # bob has 2 new rows, fewer than min_new=4
    assert first.step_round()["rows"] == {"alice": 4}
    assert first.step_round() is None  # nothing new
    add(store, "bob", 2, 3)
    result = first.step_round()
    assert result["tenants"] == ["bob"] and result["rows"] == {"bob": 4} and first.trainer.step == 6
    first.trainer.close()
    # a crash: a new loop on the same folder resumes (readers, adapters, step) and trains only what is new
    add(store, "bob", 5, 3)
    add(store, "carol", 0, 4)
    add(store, "alice", 8, 4)
    again = loop(tiny_llama_dir, tmp_path / "run", store, ["alice", "bob", "carol"])
    assert again.trainer.step == 6
    scored = Counter(SEEN)
    failed = again.step_round()  # alice, bob and carol are ready; carol's reward raises: the round is undone
    SEEN.clear()
    SEEN.update(scored)  # what that round scored was never trained (the trainer went back to its checkpoint)
    assert failed["tenants"] == ["alice", "bob", "carol"] and "carol's reward service is down" in failed["failed"]
    assert again.trainer.step == 6 and again.solo == {"alice", "bob", "carol"}
    outcomes = [again.step_round() for _ in range(3)]  # one at a time: alice, bob, then carol fails alone
    assert [(o["tenants"], "failed" in o) for o in outcomes] == [(["alice"], False), (["bob"], False), (["carol"], True)]
    assert again.waiting == {"carol": again.rounds + 3} and again.step_round() is None  # carol waits; none else is new
    again.trainer.close()
    # every alice and bob record was trained exactly once (4 completions each), none lost
    expected = {("alice", str([1, 100 + i, 12])) for i in range(12)} | {("bob", str([1, 100 + i, 10])) for i in range(8)}
    assert set(SEEN) == expected and set(SEEN.values()) == {4}, SEEN
    store.close()


def test_the_loop_settings_are_checked():
    with pytest.raises(ValueError, match="rows_per_round=2 must be >= min_new=4"):
        OnlineConfig(min_new=4, rows_per_round=2)
    with pytest.raises(ValueError, match="min_new=0 must be >= 1"):
        OnlineConfig(min_new=0)


@pytest.mark.slow
def test_preft_rl_online_trains_a_round_from_the_command_line(tiny_llama_dir, tmp_path):
    import json

    from preft_rl.cli import main

    store = SqliteTrafficStore(tmp_path / "traffic")
    add(store, "ann", 0, 4)
    store.close()
    tenants = tmp_path / "tenants.jsonl"
    tenants.write_text("\n".join(json.dumps(t) for t in [{"name": "ann", "rewards": ["style_terse"]},
                                                          {"name": "ben", "rewards": ["style_explained"]}]) + "\n")
    assert main(["online", "--tenants", str(tenants), "--record", str(tmp_path / "traffic"), "--model", str(tiny_llama_dir),
                 "--max-rounds", "1", "--min-new", "4", "--prompts-per-step", "2", "--max-completion-length", "6",
                 "--rank", "4", "--tenants-per-step", "1", "--tenant-offload", "disk", "--output-dir", str(tmp_path / "out")]) == 0
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert (tmp_path / "out" / "checkpoint-2" / "tenant_state").is_dir()  # one row in the model, the tenants on disk
    assert [entry["step"] for entry in log] == [1, 2] and all(entry["tenants/ann/traffic/rows"] == 2 for entry in log)  # 4 rows, 2 a step
    assert (tmp_path / "out" / "tenants" / "ann" / "adapter_model.safetensors").is_file()
    assert main(["online", "--tenants", str(tenants), "--record", str(tmp_path / "nowhere")]) == 2



@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "resumed_at"), [("step:3", 2), ("rename:4", 2), ("saved:4", 4)])
def test_a_loop_killed_with_sigkill_resumes_and_trains_every_record_once(tiny_llama_dir, tmp_path, kill_at, resumed_at):
    """`preft-rl online` killed with SIGKILL (its whole process group) in its second round of three: mid-round, with the
    round's checkpoint written but not renamed, and just after the checkpoint, before the push. The restarted loop
    resumes from the last whole checkpoint and trains on; its log holds every step once, and the rows trained sum to
    the records, each trained once."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    store = SqliteTrafficStore(tmp_path / "traffic")
    add(store, "ann", 0, 12)
    store.close()
    tenants = tmp_path / "tenants.jsonl"
    tenants.write_text(json.dumps({"name": "ann", "rewards": ["style_terse"]}) + "\n")
    out = tmp_path / "out"
    args = ["online", "--tenants", str(tenants), "--record", str(tmp_path / "traffic"), "--model", str(tiny_llama_dir),
            "--max-rounds", "3", "--min-new", "4", "--prompts-per-step", "2", "--max-completion-length", "16",
            "--rank", "4", "--interval", "0.1", "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    killed = subprocess.run([sys.executable, str(Path(__file__).with_name("online_killed.py")), *args],
                            env={**env, "KILL_AT": kill_at}, capture_output=True, text=True, timeout=600,
                            start_new_session=True)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-4000:]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir() == (kill_at == "saved:4")
    again = subprocess.run([sys.executable, "-m", "preft_rl.cli", *args], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert f"resumed at step {resumed_at}" in again.stderr and "3 rounds, step 6" in again.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]
    assert [entry["tenants/ann/traffic/rows"] for entry in log] == [2] * 6  # 12 records, each trained once
    assert not (out / "checkpoint-4.tmp").exists() and (out / "checkpoint-6").is_dir()
