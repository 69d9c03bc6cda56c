"""The traffic store (issue 33): appends from many threads read back in commit order, a duplicate fails alone,
feedback's refusals change nothing, pruning bounds the size, and a writer killed with SIGKILL loses only what it had
not been told was committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from preft_rl.traffic import FeedbackError, SqliteTrafficStore, TrafficRecord


def record(i: int, tenant: str = "alice", choice: int = 0, age_s: float = 0.0) -> TrafficRecord:
    return TrafficRecord(id=f"cmpl-{i}", choice=choice, tenant=tenant, time=time.time() - age_s, adapter=tenant,
                         version=1 + i % 3, prompt_ids=[1, 2, i], completion_ids=[i, i + 1], logprobs=[-0.5, -1.25 - i],
                         finish_reason="length", messages=[{"role": "user", "content": f"q{i}"}] if i % 2 else None,
                         sampled_spans=[[1, 2]] if i % 3 == 0 else [])


def test_appends_from_many_threads_read_back_exactly_in_commit_order(tmp_path):
    store = SqliteTrafficStore(tmp_path)
    futures = {}

    def writer(start):
        for i in range(start, start + 50):
            futures[i] = store.append(record(i, tenant=["alice", "bob"][i % 2]))

    threads = [threading.Thread(target=writer, args=(k * 50,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seqs = {i: future.result(timeout=30) for i, future in futures.items()}
    assert sorted(seqs.values()) == list(range(1, 201))  # every one committed, each its own seq
    alice = store.read("alice")
    assert [r.seq for r in alice] == sorted(seqs[i] for i in range(0, 200, 2))
    for r in alice:  # every field as written
        i = int(r.id.removeprefix("cmpl-"))
        assert r == TrafficRecord(**{**record(i).__dict__, "time": r.time, "seq": seqs[i]})
    middle = alice[49].seq
    assert [r.seq for r in store.read("alice", after=middle)] == [r.seq for r in alice[50:]]
    assert len(store.read("alice", after=middle, limit=7)) == 7 and store.read("carol") == []
    assert store.tenants() == ["alice", "bob"]
    with pytest.raises(ValueError, match="already stored"):
        store.append(record(4)).result(timeout=30)  # a duplicate (id, choice) fails alone
    assert store.append(record(4, choice=1)).result(timeout=30) == 201
    store.close()
    with pytest.raises(ValueError, match="2 log-probs for 3 sampled tokens"):
        TrafficRecord(**{**record(0).__dict__, "completion_ids": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"record 'cmpl-0' choice 0: sampled_spans=\[\(2, 5\)\]"):
        TrafficRecord(**{**record(0).__dict__, "sampled_spans": [[2, 5]]})  # past the 3 prompt tokens


def test_feedback_goes_only_to_the_tenants_own_recorded_responses_once(tmp_path):
    store = SqliteTrafficStore(tmp_path)
    store.append(record(1, "alice")).result(timeout=30)
    store.append(record(2, "bob")).result(timeout=30)
    store.add_feedback("alice", "cmpl-1", 0, 1.0)
    refusals = [(("alice", "cmpl-2", 0), 404), (("alice", "cmpl-9", 0), 404), (("alice", "cmpl-1", 1), 404),
                (("alice", "cmpl-1", 0), 409)]
    messages = {}
    for (tenant, id_, choice), status in refusals:
        with pytest.raises(FeedbackError) as info:
            store.add_feedback(tenant, id_, choice, 0.5)
        assert info.value.status == status
        messages[id_, choice] = info.value.message
    assert messages["cmpl-2", 0].replace("cmpl-2", "cmpl-9") == messages["cmpl-9", 0]  # bob's reads as none at all
    assert store.feedback("alice", [("cmpl-1", 0), ("cmpl-2", 0)]) == {("cmpl-1", 0): 1.0}
    assert store.feedback("bob", [("cmpl-2", 0)]) == {}
    store.close()


def test_pruning_keeps_each_tenants_newest_records_and_drops_old_ones(tmp_path):
    store = SqliteTrafficStore(tmp_path)
    for i in range(10):
        store.append(record(i, "alice", age_s=1000 if i < 3 else 0)).result(timeout=30)
        store.append(record(100 + i, "bob")).result(timeout=30)
    store.add_feedback("alice", "cmpl-0", 0, 1.0)
    assert store.prune(max_age_s=500) == 3  # alice's first three
    assert store.feedback("alice", [("cmpl-0", 0)]) == {}  # its feedback went with it
    assert store.prune(max_records=4) == 3 + 6
    assert [r.id for r in store.read("alice")] == [f"cmpl-{i}" for i in range(6, 10)]
    assert [r.id for r in store.read("bob")] == [f"cmpl-{100 + i}" for i in range(6, 10)]
    store.close()
    bounded = SqliteTrafficStore(tmp_path / "b", max_records=5, prune_every=1)
    for i in range(12):
        bounded.append(record(i)).result(timeout=30)
    bounded.close()
    assert len(SqliteTrafficStore(tmp_path / "b").read("alice")) == 5  # pruned after every commit
    with pytest.raises(ValueError, match="max_records=0 must be > 0"):
        SqliteTrafficStore(tmp_path / "c", max_records=0)


def test_a_writer_killed_with_sigkill_loses_nothing_it_reported_committed(tmp_path):
    """A process appends records and prints each seq once committed; SIGKILL mid-stream; every printed record reads
    back intact, and a new store opens the file and goes on."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_traffic_store import record
        from preft_rl.traffic import SqliteTrafficStore
        store = SqliteTrafficStore({str(tmp_path)!r})
        i = 0
        while True:
            futures = [store.append(record(i + k)) for k in range(8)]
            for future in futures:
                print(future.result(), flush=True)
            i += 8
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(int(line))
        if len(seen) >= 400:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = SqliteTrafficStore(tmp_path)
    stored = {r.seq: r for r in store.read("alice")}
    assert set(seen) <= set(stored)  # nothing reported committed is lost
    for seq in seen:
        i = int(stored[seq].id.removeprefix("cmpl-"))
        assert stored[seq] == TrafficRecord(**{**record(i).__dict__, "time": stored[seq].time, "seq": seq})
    assert store.append(record(10**6)).result(timeout=30) > max(stored)
    store.close()


def test_a_recorder_names_records_as_the_client_sees_them_and_gathers_streamed_tokens():
    from types import SimpleNamespace as NS

    from preft_rl.traffic.recording import RequestRecorder, feedback_reward, response_id

    assert response_id("cmpl-abc-7-2", n=3) == ("cmpl-abc-7", 6)  # completions: prompt 2 of n=3 starts at choice 6
    assert response_id("chatcmpl-abc-1", n=2) == ("chatcmpl-abc-1", 0)  # chat: the id itself

    def output(index, ids, lps, finish=None):
        logprobs = [{t: NS(logprob=lp), t + 1: NS(logprob=-9.0)} for t, lp in zip(ids, lps)]
        return NS(outputs=[NS(index=index, token_ids=ids, logprobs=logprobs, finish_reason=finish)])

    delta = RequestRecorder(engine_request_id="cmpl-x-1", n=2, tenant="t", adapter="a", version=3, prompt_ids=[5, 6],
                            messages=None, delta=True)
    for out in (output(0, [1, 2], [-0.1, -0.2]), output(1, [7], [-0.7]), output(0, [3], [-0.3], "length"),
                output(1, [8], [-0.8], "stop")):
        delta.add(out)
    records = delta.records()
    assert [(r.id, r.choice, r.completion_ids, r.logprobs, r.finish_reason) for r in records] == [
        ("cmpl-x", 2, [1, 2, 3], [-0.1, -0.2, -0.3], "length"), ("cmpl-x", 3, [7, 8], [-0.7, -0.8], "stop")]
    cumulative = RequestRecorder(engine_request_id="chatcmpl-y", n=1, tenant="t", adapter="a", version=1, prompt_ids=[5],
                                 messages=[{"role": "user", "content": "hi"}], delta=False)
    cumulative.add(output(0, [1], [-0.1]))
    cumulative.add(output(0, [1, 2], [-0.1, -0.2], "length"))
    assert [(r.completion_ids, r.logprobs) for r in cumulative.records()] == [([1, 2], [-0.1, -0.2])]
    with pytest.raises(RuntimeError, match="recording needs sampling params with logprobs >= 0"):
        cumulative.add(NS(outputs=[NS(index=0, token_ids=[1], logprobs=None, finish_reason=None)]))

    assert feedback_reward({"reward": 0.25}) == 0.25 and feedback_reward({"thumbs": "up"}) == 1.0
    assert feedback_reward({"thumbs": "down"}) == 0.0 and feedback_reward({"reward": 1}) == 1.0
    for body in ({"reward": 1.5}, {"reward": float("nan")}, {"reward": "1"}, {"reward": False}, {},
                 {"reward": 1, "thumbs": "up"}, {"thumbs": "meh"}):
        with pytest.raises(ValueError):
            feedback_reward(body)


def test_a_reader_gives_each_record_once_per_role_in_a_seeded_order_and_resumes(tmp_path):
    from preft_rl.traffic.data import TrafficReader

    store = SqliteTrafficStore(tmp_path)
    for i in range(10):
        store.append(record(i, "alice", age_s=10_000 if i == 0 else 0)).result(timeout=30)
        store.append(record(100 + i, "bob")).result(timeout=30)
    reader = TrafficReader(store, "alice", seed=3, max_age_s=3600, max_staleness=1)
    reader.refresh()
    assert reader.available() == {"prompt": 9, "served": 0} and reader.counts.too_old == 1  # record 0: out of the window
    first = reader.take_prompts(4)
    again = TrafficReader(store, "alice", seed=3, max_age_s=3600)
    again.refresh()
    assert [r.id for r in again.take_prompts(4)] == [r.id for r in first]  # same seed, same log: same order
    other = TrafficReader(store, "alice", seed=4, max_age_s=3600)
    other.refresh()
    assert [r.id for r in other.take_prompts(9)] != [r.id for r in first + reader.pending["prompt"]]
    assert all(r.tenant == "alice" for r in first)
    # feedback arrives: the served role sees it in order of arrival (seeded within its block), staleness checked
    for i in (3, 5, 7):
        store.add_feedback("alice", f"cmpl-{i}", 0, i / 10)
    state = reader.state_dict()
    resumed = TrafficReader(store, "alice", seed=3, max_age_s=3600, max_staleness=1)
    resumed.load_state_dict(state)
    rest = reader.take_prompts(100)
    assert [r.id for r in resumed.take_prompts(100)] == [r.id for r in rest]  # resumed: the same unused records
    assert sorted(r.id for r in first + rest) == sorted(f"cmpl-{i}" for i in range(1, 10))  # each once, none lost
    reader.refresh()
    assert reader.available() == {"prompt": 0, "served": 3}
    served = reader.take_served(10, current_version=3)  # versions 1 + i % 3: 3 -> 1 (stale), 5 -> 3, 7 -> 2
    assert sorted(row.record.id for row in served) == ["cmpl-5", "cmpl-7"] and reader.counts.stale == 1
    assert {row.record.id: row.reward for row in served} == {"cmpl-5": 0.5, "cmpl-7": 0.7}
    store.append(record(50, "alice")).result(timeout=30)
    reader.refresh()
    assert [r.id for r in reader.take_prompts(5)] == ["cmpl-50"]  # only what is new
    with pytest.raises(ValueError, match="cannot resume tenant 'bob'"):
        TrafficReader(store, "bob", seed=3).load_state_dict(state)
    store.close()


def test_bench_traffic_store_counts_every_record_it_commits(tmp_path, capsys):
    from preft_rl.cli import main

    assert main(["bench", "traffic-store", "--records", "60", "--writers", "1,3", "--prompt-len", "4", "--gen-len", "4",
                 "--out", str(tmp_path)]) == 0
    import json

    runs = json.loads((tmp_path / "traffic-store.json").read_text())["runs"]
    assert [(r["writers"], r["records"]) for r in runs] == [(1, 60), (3, 60)] and all(r["records_s"] > 0 for r in runs)
    assert "| 3 | 60 |" in (tmp_path / "traffic-store.md").read_text()
    assert main(["bench", "traffic-store", "--writers", "0"]) == 2
