"""Training on live traffic (issue 33, item 4): a tenant's recorded prompts become its training prompts, and a served
response with feedback joins its prompt's group as an off-policy member: its recorded tokens, the user's reward, and
a truncated importance weight from the log-probs recorded when it was served. Tiny Llama, fp32, CPU."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, Tenant
from preft_rl.traffic import SqliteTrafficStore, TrafficRecord
from preft_rl.traffic.data import TrafficReader, traffic_dataset
from test_multitenant import PREFT, TRAJECTORY_ATOL, adapter, even_tokens, odd_tokens

pytest.importorskip("vllm")

SHIFT = 0.3  # bob's recorded log-probs are this much below the policy's: his served tokens weigh exp(0.3) each


def recorded_store(model_dir, path, shifts: dict[str, float], count: int = 4, feedback: int = 2,
                   spans: dict[str, list[list[int]]] | None = None) -> SqliteTrafficStore:
    """Each tenant's `count` served requests: a prompt (with the tenant's `spans` marked as earlier sampled turns), 6
    random sampled tokens and their log-probs under the base model (the policy before training: an adapter that does
    nothing yet, so the spans do not change them) minus the tenant's shift; the first `feedback` rated 1, 0, 1, ..."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    store = SqliteTrafficStore(path)
    gen = torch.Generator().manual_seed(0)
    for tenant, shift in shifts.items():
        for i in range(count):
            prompt = tokenizer.encode(f"{tenant} asks {i} apples?")
            completion = torch.randint(10, 200, (6,), generator=gen).tolist()
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion])).logits[0].float()
            logps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            store.append(TrafficRecord(id=f"cmpl-{tenant}-{i}", choice=0, tenant=tenant, time=time.time(), adapter=tenant,
                                       version=1, prompt_ids=prompt, completion_ids=completion,
                                       logprobs=(logps - shift).tolist(), finish_reason="length",
                                       sampled_spans=(spans or {}).get(tenant, []))).result(timeout=30)
        for i in range(feedback):
            store.add_feedback(tenant, f"cmpl-{tenant}-{i}", 0, float(i % 2 == 0))
    return store


def config(tmp_path, **overrides) -> PreftGRPOConfig:
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    num_generations=4, max_steps=1, max_completion_length=6, learning_rate=3e-2, save_steps=0,
                    disable_tqdm=True, loss_type="dapo", engine_kwargs={"max_num_batched_tokens": 512})
    settings.update(overrides)
    return PreftGRPOConfig(**settings)


def test_a_served_response_joins_its_group_with_its_feedback_and_recorded_log_probs(tiny_llama_dir, tmp_path):
    store = recorded_store(tiny_llama_dir, tmp_path / "traffic", {"alice": 0.0, "bob": SHIFT}, spans={"bob": [[1, 3]]})
    readers = {name: TrafficReader(store, name, seed=0) for name in ("alice", "bob")}
    data = {name: traffic_dataset(reader, prompts=0, served=2, current_version=1) for name, reader in readers.items()}
    assert len(data["alice"]) == 2 and readers["alice"].available() == {"prompt": 4, "served": 0}
    trainer = PreftGRPOTrainer(str(tiny_llama_dir), args=config(tmp_path / "run"), preft_config=PreftConfig(**PREFT),
                               tenants=[Tenant("alice", data["alice"], [even_tokens]), Tenant("bob", data["bob"], [odd_tokens])])
    trainer.train()
    batch = trainer._rollout
    trainer.close()
    served = [i for i, flag in enumerate(batch.served) if flag]
    assert len(served) == 4 and all(i % 4 == 3 for i in served)  # last in each of the 4 groups
    records = {(r.tenant, tuple(r.completion_ids)): r for name in ("alice", "bob") for r in store.read(name)}
    for i in served:
        ids = batch.input_ids[i][batch.completion_mask[i].bool()].tolist()
        rec = records[batch.tenants[i], tuple(ids)]  # the recorded tokens, as served
        assert batch.rewards[i].item() == float(rec.id.endswith("-0"))  # the user's feedback (1, 0), not a reward function
        logps = batch.engine_logps[i][batch.completion_mask[i].bool()]
        torch.testing.assert_close(logps, torch.tensor(rec.logprobs), rtol=0, atol=1e-6)
    for i, tenant in enumerate(batch.tenants):  # bob's earlier turn (his recorded spans) is plain in every row of his
        adapted = batch.prompt_mask[i, :6].tolist()
        assert adapted == ([True, False, False, True, True, True] if tenant == "bob" else [True] * 6), (tenant, adapted)
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert log["tenants/alice/traffic/rows"] == 2 and log["tenants/alice/traffic/feedback_rows"] == 2
    assert log["tenants/alice/traffic/staleness"] == 0 and log["tenants/alice/traffic/feedback_reward"] == 0.5
    # the weight is exp(policy - recorded) per token, truncated: 1 where the recorded log-probs are the policy's,
    # exp(0.3) where they are 0.3 below (fp32 HF vs the trainer's forward: agree to ~1e-6)
    assert log["tenants/alice/traffic/is_weight"] == pytest.approx(1.0, abs=1e-4)
    assert log["tenants/bob/traffic/is_weight"] == pytest.approx(math.exp(SHIFT), abs=1e-4)
    store.close()


@pytest.mark.slow
@pytest.mark.numerics
def test_traffic_tenants_trained_together_equal_each_trained_alone(tiny_llama_dir, tmp_path):
    """Two tenants on their traffic (2 served responses with feedback and 2 recorded prompts each, 2 steps) together give
    each the adapter it gets alone."""
    store = recorded_store(tiny_llama_dir, tmp_path / "traffic", {"alice": 0.0, "bob": SHIFT})

    def data(name):
        return traffic_dataset(TrafficReader(store, name, seed=1), prompts=2, served=2, current_version=1)

    def run(out, names):
        rewards = {"alice": [even_tokens], "bob": [odd_tokens]}
        trainer = PreftGRPOTrainer(str(tiny_llama_dir), args=config(out, max_steps=2), preft_config=PreftConfig(**PREFT),
                                   tenants=[Tenant(name, data(name), rewards[name]) for name in names])
        trainer.train()
        trainer.close()

    run(tmp_path / "together", ["alice", "bob"])
    for name in ("alice", "bob"):
        run(tmp_path / name, [name])
        ours, theirs = adapter(tmp_path / "together" / "tenants" / name), adapter(tmp_path / name / "tenants" / name)
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert diff <= TRAJECTORY_ATOL, (name, diff)
        assert max(v.abs().max().item() for k, v in theirs.items() if ".B" in k or "lora_B" in k) > 10 * TRAJECTORY_ATOL
    store.close()


def test_traffic_rows_are_refused_where_they_would_be_trained_wrong(tiny_llama_dir, tmp_path):
    store = recorded_store(tiny_llama_dir, tmp_path / "traffic", {"alice": 0.0}, count=2, feedback=1)
    data = traffic_dataset(TrafficReader(store, "alice"), prompts=1, served=1, current_version=1)
    with pytest.raises(ValueError, match="served responses join their groups in a tenants run only"):
        PreftGRPOTrainer(str(tiny_llama_dir), [even_tokens], args=config(tmp_path / "a"), train_dataset=data,
                         preft_config=PreftConfig(**PREFT))
    with pytest.raises(ValueError, match="set vllm_importance_sampling_correction=True"):
        PreftGRPOTrainer(str(tiny_llama_dir), args=config(tmp_path / "b", vllm_importance_sampling_correction=False),
                         tenants=[Tenant("alice", data, [even_tokens])], preft_config=PreftConfig(**PREFT))
    with pytest.raises(ValueError, match="no new traffic"):
        traffic_dataset(TrafficReader(store, "nobody"), prompts=4, served=4, current_version=1)
    store.close()


def test_a_tenant_trains_on_its_whole_recorded_log_with_traffic_dir(tiny_llama_dir, tmp_path):
    store = recorded_store(tiny_llama_dir, tmp_path / "traffic", {"alice": 0.0, "bob": 0.0}, count=3, feedback=2)
    store.close()
    trainer = PreftGRPOTrainer(str(tiny_llama_dir), args=config(tmp_path / "run"), preft_config=PreftConfig(**PREFT),
                               tenants=[Tenant("alice", reward_funcs=[even_tokens], traffic=tmp_path / "traffic")])
    rows = trainer.tasks[0].dataset
    trainer.close()
    assert len(rows) == 2 + 3 and sorted(rows["traffic_id"]) == sorted(["cmpl-alice-0", "cmpl-alice-1"] +
                                                                        [f"cmpl-alice-{i}" for i in range(3)])
    assert sum(r == r for r in rows["served_reward"]) == 2  # the two with feedback carry it (the others: NaN)
    with pytest.raises(ValueError, match="give train_dataset or traffic"):
        Tenant("alice", rows, [even_tokens], traffic=tmp_path / "traffic")
    with pytest.raises(ValueError, match="no traffic recorded"):
        PreftGRPOTrainer(str(tiny_llama_dir), args=config(tmp_path / "run2"), preft_config=PreftConfig(**PREFT),
                         tenants=[Tenant("carol", reward_funcs=[even_tokens], traffic=tmp_path / "traffic")])


SEEN: list[tuple[str, str]] = []  # (tenant, prompt) of every completion scored, in order


def seen_even(prompts, completions, completion_ids=None, **_):
    SEEN.extend(("alice", str(p)) for p in prompts)
    return even_tokens(prompts, completions, completion_ids)


def seen_odd(prompts, completions, completion_ids=None, **_):
    SEEN.extend(("bob", str(p)) for p in prompts)
    return odd_tokens(prompts, completions, completion_ids)


def round_data(name: str, round_: int, rows: int = 4):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"{name} round {round_} asks {i} apples?"} for i in range(rows)])


@pytest.mark.slow
@pytest.mark.numerics
def test_rounds_give_each_row_once_continue_the_run_and_resume(tiny_llama_dir, tmp_path):
    """train_round (the online loop's round): round 1 trains alice on 4 new rows, round 2 alice and bob on 4 each;
    every row gets exactly one group; together equals alone across rounds; a trainer rebuilt after round 1 and resumed
    from its checkpoint ends round 2 where the uninterrupted run does."""
    args = dict(lr_scheduler_type="constant", save_steps=0)

    def trainer(out, names):
        rewards = {"alice": [seen_even], "bob": [seen_odd]}
        return PreftGRPOTrainer(str(tiny_llama_dir), args=config(out, **args), preft_config=PreftConfig(**PREFT),
                                tenants=[Tenant(name, round_data(name, 0), rewards[name]) for name in names])

    SEEN.clear()
    run = trainer(tmp_path / "run", ["alice", "bob"])
    run.train_round({"alice": round_data("alice", 1)})
    assert run.step == 2 and sorted(SEEN) == sorted(("alice", f"alice round 1 asks {i} apples?") for i in range(4)
                                                     for _ in range(4))  # 4 rows x 4 completions, each row once
    SEEN.clear()
    run.train_round({"alice": round_data("alice", 2), "bob": round_data("bob", 1)})
    assert run.step == 4 and sorted(set(SEEN)) == sorted([("alice", f"alice round 2 asks {i} apples?") for i in range(4)]
                                                         + [("bob", f"bob round 1 asks {i} apples?") for i in range(4)])
    assert len(SEEN) == 2 * 4 * 4
    with pytest.raises(ValueError, match="unknown tenants \\['carol'\\]"):
        run.train_round({"carol": round_data("carol", 1)})
    run.close()
    # alone: alice's two rounds in a run of her own
    alone = trainer(tmp_path / "alone", ["alice"])
    alone.train_round({"alice": round_data("alice", 1)})
    alone.train_round({"alice": round_data("alice", 2)})
    alone.close()
    ours, theirs = adapter(tmp_path / "run" / "tenants" / "alice"), adapter(tmp_path / "alone" / "tenants" / "alice")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= TRAJECTORY_ATOL
    # a crash after round 1: a new trainer resumes from round 1's checkpoint and trains round 2
    first = trainer(tmp_path / "crash", ["alice", "bob"])
    first.train_round({"alice": round_data("alice", 1)})
    first.close()
    again = trainer(tmp_path / "crash", ["alice", "bob"])
    assert again.load_checkpoint() == 2 and again._rounds == first._rounds
    again.train_round({"alice": round_data("alice", 2), "bob": round_data("bob", 1)})
    again.close()
    for name in ("alice", "bob"):
        resumed, straight = adapter(tmp_path / "crash" / "tenants" / name), adapter(tmp_path / "run" / "tenants" / name)
        assert all(torch.equal(resumed[k], straight[k]) for k in resumed), name


@pytest.mark.slow
def test_rounds_with_tenant_offload_equal_rounds_with_every_tenant_in_the_model(tiny_llama_dir, tmp_path):
    """The online loop's rounds with 3 tenants and 2 rows in the model: tenants leave and re-enter their rows between
    rounds (their adapters and AdamW state in host memory or on disk), and every adapter ends bit-identical to a run
    that holds every tenant."""
    def run(offload):
        trainer = PreftGRPOTrainer(str(tiny_llama_dir), preft_config=PreftConfig(**PREFT), args=config(
            tmp_path / str(offload), lr_scheduler_type="constant", save_steps=0, tenants_per_step=2, tenant_offload=offload),
            tenants=[Tenant(n, round_data(n, 0), [r]) for n, r in [("alice", even_tokens), ("bob", odd_tokens),
                                                                   ("carol", even_tokens)]])
        for names, round_ in [(["alice"], 1), (["alice", "bob"], 2), (["carol", "bob"], 3)]:
            trainer.train_round({name: round_data(name, round_) for name in names})
        trainer.close()
        assert trainer.step == 6

    for offload in (None, "cpu", "disk"):
        run(offload)
    for name in ("alice", "bob", "carol"):
        held = adapter(tmp_path / "None" / "tenants" / name)
        for offload in ("cpu", "disk"):
            moved = adapter(tmp_path / offload / "tenants" / name)
            assert all(torch.equal(held[k], moved[k]) for k in held), (name, offload)


def test_a_round_is_refused_where_it_cannot_be_trained_as_asked(tiny_llama_dir, tmp_path):
    run = PreftGRPOTrainer(str(tiny_llama_dir), args=config(tmp_path, lr_scheduler_type="cosine"),
                           preft_config=PreftConfig(**PREFT), tenants=[Tenant("alice", round_data("alice", 0), [even_tokens])])
    with pytest.raises(ValueError, match="needs lr_scheduler_type='constant', not 'cosine'"):
        run.train_round({"alice": round_data("alice", 1)})
    run.close()
    two = PreftGRPOTrainer(str(tiny_llama_dir), args=config(tmp_path / "two", tenants_per_step=1),
                           preft_config=PreftConfig(**PREFT),
                           tenants=[Tenant(n, round_data(n, 0), [even_tokens]) for n in ("alice", "bob")])
    with pytest.raises(ValueError, match="2 tenants but tenants_per_step=1"):
        two.train_round({"alice": round_data("alice", 1), "bob": round_data("bob", 1)})
    with pytest.raises(ValueError, match="steps=0 must be a positive multiple"):
        two.train_round({"alice": round_data("alice", 1)}, steps=0)
    assert two.step == 0  # nothing trained by a refused round
    two.close()
