"""PreftEngine vs the Hugging Face reference (PreftModel.generate), on the tiny Llama in fp32 on CPU.

One engine per method for the whole session (vLLM start-up is the slow part); each test registers
adapters under its own names.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from preft_rl import PreftConfig, PreftModel, get_preft_model

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from preft_rl.engine import PreftEngine  # noqa: E402
from preft_rl.engine.registry import AdapterRegistry, ModelShape  # noqa: E402
from conftest import ENGINE_ARGS, random_adapter_model  # noqa: E402

CONFIGS = {
    "lora": PreftConfig(method="lora", r=4, alpha=8),
    "loreft": PreftConfig(method="loreft", r=4, positions="f3+l3"),
}
GEN = 8


def reference_model(load_tiny, method: str, seed: int) -> PreftModel:
    return random_adapter_model(load_tiny, CONFIGS[method], seed)


def reference_greedy(model: PreftModel | None, base, prompt: list[int], max_new_tokens: int = GEN) -> list[int]:
    ids = torch.tensor([prompt])
    if model is None:
        out = base.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy(max_tokens: int = GEN, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def random_prompt(rng: np.random.Generator, length: int) -> list[int]:
    return rng.integers(7, 380, size=length).tolist()


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_mixed_batch_matches_hf_reference(engines, load_tiny, method):
    engine = engines(method)
    refs = {f"mix-{method}-{i}": reference_model(load_tiny, method, seed=10 + i) for i in range(3)}
    for name, model in refs.items():
        engine.add_adapter(name, model)
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng, n) for n in (200, 9, 33, 17, 50)]  # 200 > 128: chunked prefill
    names = [f"mix-{method}-0", f"mix-{method}-1", None, f"mix-{method}-2", f"mix-{method}-0"]
    engine._runtime.step_log.clear()
    outs = engine.generate(prompts, greedy(), adapters=names)
    assert max(tokens for tokens, _ in engine._runtime.step_log) <= 128  # the long prompt was chunked
    base = load_tiny()
    for prompt, name, out in zip(prompts, names, outs):
        assert out.prompt_token_ids == prompt
        expected = reference_greedy(refs[name] if name else None, base, prompt)
        assert list(out.outputs[0].token_ids) == expected, name
    # and the adapters mattered: adapted requests differ from the base model's output
    differs = [list(o.outputs[0].token_ids) != reference_greedy(None, base, p) for p, n, o in zip(prompts, names, outs) if n]
    assert sum(differs) >= 2


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_separate_first_last_interventions_match_hf_reference(engines, load_tiny, method):
    """ReFT with share_first_last=False next to shared ones in one batch: overlapping ranges (a token in
    both gets 'first' then 'last'), a chunked long prompt, and a shared adapter registered before the
    "last" tensors existed."""
    engine = engines(method)
    base = load_tiny()

    def adapter(seed: int, **config) -> PreftModel:
        return random_adapter_model(load_tiny, PreftConfig(method=method, r=4, **config), seed)

    refs = {"sfl-shared": adapter(30, positions="f2+l3")}
    engine.add_adapter("sfl-shared", refs["sfl-shared"])
    refs["sfl-split"] = adapter(31, positions="f2+l3", share_first_last=False)
    refs["sfl-split-wide"] = adapter(32, positions="f5+l6", share_first_last=False, layers=[1])
    for name in ("sfl-split", "sfl-split-wide"):
        engine.add_adapter(name, refs[name])
    rng = np.random.default_rng(5)
    prompts = [random_prompt(rng, n) for n in (4, 200, 9, 4, 30)]  # 4 tokens: f2 and l3 overlap at position 1
    names = ["sfl-split", "sfl-split", "sfl-split-wide", "sfl-shared", "sfl-split-wide"]
    outs = engine.generate(prompts, greedy(), adapters=names)
    for prompt, name, out in zip(prompts, names, outs):
        assert list(out.outputs[0].token_ids) == reference_greedy(refs[name], base, prompt), (name, len(prompt))
    # the 'last' interventions mattered: dropping them changes the output
    first_only = adapter(31, positions="f2+l3", share_first_last=False)
    with torch.no_grad():
        for name, param in first_only.adapter_named_parameters():
            if ".last." in name:
                param.zero_()
    assert any(reference_greedy(first_only, base, p) != list(o.outputs[0].token_ids)
               for p, n, o in zip(prompts, names, outs) if n == "sfl-split")
    # an in-place update (as the trainer's sync does) reaches both interventions
    updated = adapter(33, positions="f2+l3", share_first_last=False)
    engine.update_adapter("sfl-split", updated.adapter_state_dict())
    out = engine.generate([prompts[0]], greedy(), adapters=["sfl-split"])[0]
    assert list(out.outputs[0].token_ids) == reference_greedy(updated, base, prompts[0])


def test_logprobs_match_hf_reference(engines, load_tiny):
    engine = engines("lora")
    ref = reference_model(load_tiny, "lora", seed=3)
    engine.add_adapter("logprobs", ref)
    rng = np.random.default_rng(1)
    prompts = [random_prompt(rng, n) for n in (20, 41)]
    temperature = 0.7
    params = SamplingParams(max_tokens=12, temperature=temperature, logprobs=0, seed=123, ignore_eos=True)
    outs = engine.generate(prompts, params, adapters=["logprobs", "logprobs"])
    for prompt, out in zip(prompts, outs):
        completion = list(out.outputs[0].token_ids)
        engine_lp = torch.tensor([lp[tok].logprob for lp, tok in zip(out.outputs[0].logprobs, completion)])
        ids = torch.tensor([prompt + completion])
        prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
        prompt_mask[0, : len(prompt)] = True
        with torch.no_grad():
            logits = ref(input_ids=ids, prompt_mask=prompt_mask).logits[0, len(prompt) - 1 : -1]
        hf_lp = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        # processed log-probs (after temperature), fp32 on both sides: measured max gap ~1e-6
        torch.testing.assert_close(engine_lp, hf_lp, atol=1e-4, rtol=0)


def test_seeded_sampling_is_unchanged_by_chunked_prefill(engines, load_tiny):
    """A seeded request samples the same tokens whether or not its prompt was split over steps (vLLM-CPU
    used to raise "CPU Generator does not use offset" on the discarded sample of a partial prefill)."""
    engine = engines("lora")
    engine.add_adapter("seeded", reference_model(load_tiny, "lora", seed=6))
    rng = np.random.default_rng(6)
    filler, prompt = random_prompt(rng, 90), random_prompt(rng, 100)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    alone = engine.generate([prompt], params, adapters=["seeded"])[0]
    engine._runtime.step_log.clear()
    both = engine.generate([filler, prompt], [SamplingParams(max_tokens=8, temperature=1.0, seed=8), params],
                           adapters=["seeded", "seeded"])
    assert engine._runtime.step_log[0][0] == 128 and engine._runtime.step_log[1][0] > 2  # prompt split 38 + 62
    assert list(both[1].outputs[0].token_ids) == list(alone.outputs[0].token_ids)
    # the seed is what makes them equal: another seed samples something else
    other = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=9, ignore_eos=True), adapters=["seeded"])[0]
    assert list(other.outputs[0].token_ids) != list(alone.outputs[0].token_ids)


def test_prefix_cache_is_keyed_by_adapter_version_and_prompt(engines, load_tiny):
    engine = engines("lora")
    a, b = reference_model(load_tiny, "lora", seed=21), reference_model(load_tiny, "lora", seed=22)
    engine.add_adapter("cache-a", a)
    engine.add_adapter("cache-b", b)
    base = load_tiny()
    prompt = random_prompt(np.random.default_rng(2), 300)  # > 2 KV blocks of 128 tokens

    first = engine.generate([prompt], greedy(), adapters=["cache-a"])[0]
    again = engine.generate([prompt], greedy(), adapters=["cache-a"])[0]
    assert again.num_cached_tokens > 0  # same adapter, same version: cache hit
    assert list(first.outputs[0].token_ids) == list(again.outputs[0].token_ids) == reference_greedy(a, base, prompt)

    other = engine.generate([prompt], greedy(), adapters=["cache-b"])[0]
    assert other.num_cached_tokens == 0  # another adapter never sees cache-a's prompt KV
    assert list(other.outputs[0].token_ids) == reference_greedy(b, base, prompt)
    assert list(other.outputs[0].token_ids) != list(first.outputs[0].token_ids)

    updated = reference_model(load_tiny, "lora", seed=23)
    engine.update_adapter("cache-a", updated.adapter_state_dict())
    fresh = engine.generate([prompt], greedy(), adapters=["cache-a"])[0]
    assert fresh.num_cached_tokens == 0  # no stale hit after an update
    assert list(fresh.outputs[0].token_ids) == reference_greedy(updated, base, prompt)

    # A second turn extends turn one's prompt + completion: the completion's KV was computed plain, but in
    # the new prompt those tokens are prompt tokens (adapted), so they must not come from the cache.
    second_turn = prompt + list(fresh.outputs[0].token_ids) + random_prompt(np.random.default_rng(3), 20)
    out = engine.generate([second_turn], greedy(), adapters=["cache-a"])[0]
    assert list(out.outputs[0].token_ids) == reference_greedy(updated, base, second_turn)


def test_pure_decode_steps_do_no_adapter_work(engines, load_tiny):
    engine = engines("lora")
    engine.add_adapter("spy", reference_model(load_tiny, "lora", seed=4))
    runtime = engine._runtime
    runtime.step_log.clear()
    calls_before = runtime.adapter_calls
    hooks = runtime.runner.model.preft_hooks  # eager: the hooks are attached only for steps that apply adapters
    attached, for_step = [], hooks.for_step
    hooks.for_step = lambda applies: (for_step(applies), attached.append(hooks.attached))
    try:
        engine.generate([random_prompt(np.random.default_rng(4), 20)], greedy(max_tokens=10), adapters=["spy"])
    finally:
        del hooks.for_step
    assert runtime.step_log[0] == (20, 1)  # the prefill step: one adapter group
    assert list(runtime.step_log)[1:] == [(1, 0)] * 9  # every decode step: no selection at all
    assert runtime.adapter_calls - calls_before == 2 * 4  # 2 layers x 4 fused modules, prefill only
    assert attached == [True] + [False] * 9  # a decode step runs vLLM's modules without any hook
    assert not hooks.always and all(not module._forward_hooks for module, _ in hooks.specs)


def test_sixty_four_adapters_in_one_batch(engines, load_tiny):
    engine = engines("lora")
    template = reference_model(load_tiny, "lora", seed=5)
    states = {}
    for i in range(64):
        gen = torch.Generator().manual_seed(100 + i)
        states[f"many-{i}"] = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in template.adapter_state_dict().items()}
        engine.add_adapter(f"many-{i}", states[f"many-{i}"], config=CONFIGS["lora"])
    rng = np.random.default_rng(5)
    prompts = [random_prompt(rng, 6) for _ in range(64)]
    names = [f"many-{i}" for i in range(64)]
    distinct_per_step = []
    engine._runtime.on_selection = lambda sel: distinct_per_step.append(0 if sel is None else sel.num_adapters)
    try:
        outs = engine.generate(prompts, greedy(max_tokens=4), adapters=names)
    finally:
        engine._runtime.on_selection = None
    assert max(distinct_per_step) >= 3
    base = load_tiny()
    for i in (0, 31, 63):
        ref = get_preft_model(load_tiny(), CONFIGS["lora"])
        ref.load_adapter_state_dict(states[f"many-{i}"])
        assert list(outs[i].outputs[0].token_ids) == reference_greedy(ref, base, prompts[i], 4)


def test_n_greater_than_one_and_preemption(tiny_llama_dir, load_tiny, engines):
    engines("lora")  # keep the shared engine alive while this small one comes and goes
    # 6 KV blocks of 128 tokens for 8 sequences of ~150 tokens: the scheduler must preempt and recompute.
    with PreftEngine(str(tiny_llama_dir), max_adapters=4, max_rank=8, method="lora", num_gpu_blocks_override=6, **ENGINE_ARGS) as engine:
        refs = [reference_model(load_tiny, "lora", seed=30 + i) for i in range(2)]
        engine.add_adapter("p0", refs[0])
        engine.add_adapter("p1", refs[1])
        scheduler = engine.llm.llm_engine.engine_core.engine_core.scheduler
        preempted = []
        original = scheduler._preempt_request
        scheduler._preempt_request = lambda req, *a, **k: (preempted.append(req.request_id), original(req, *a, **k))[1]
        rng = np.random.default_rng(6)
        prompts = [random_prompt(rng, 110) for _ in range(4)]
        names = ["p0", "p1", None, "p0"]
        # vLLM refuses n > 1 with temperature 0; top_k=1 sampling is greedy and allowed
        params = SamplingParams(max_tokens=40, n=2, temperature=1.0, top_k=1, ignore_eos=True)
        outs = engine.generate(prompts, params, adapters=names)
        assert preempted, "the test did not force a preemption; lower num_gpu_blocks_override"
        base = load_tiny()
        for prompt, name, out in zip(prompts, names, outs):
            expected = reference_greedy(refs[int(name[1])] if name else None, base, prompt, 40)
            assert len(out.outputs) == 2
            for child in out.outputs:
                assert list(child.token_ids) == expected, name
        # Seeded sampling survives preemption and recompute (and the chunked recompute's discarded samples on
        # vLLM-CPU): the same tokens as the shared engine, whose KV cache never runs out.
        preempted.clear()
        seeded = [SamplingParams(max_tokens=40, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(4)]
        small = engine.generate(prompts, seeded, adapters=names)
        assert preempted
    roomy = engines("lora")
    for i, ref in enumerate(refs):
        if f"roomy-p{i}" not in roomy.adapters:
            roomy.add_adapter(f"roomy-p{i}", ref)
    large = roomy.generate(prompts, seeded, adapters=[f"roomy-{n}" if n else None for n in names])
    assert [list(o.outputs[0].token_ids) for o in small] == [list(o.outputs[0].token_ids) for o in large]


def test_bad_inputs_fail_clearly_and_leave_the_engine_usable(engines, load_tiny):
    engine = engines("lora")
    ref = reference_model(load_tiny, "lora", seed=7)
    engine.add_adapter("good", ref)
    state = ref.adapter_state_dict()
    with pytest.raises(ValueError, match="rank 16 but the engine was started with max_rank=8; start it with max_rank>=16"):
        engine.add_adapter("too-big", state, config=PreftConfig(method="lora", r=16))
    bad_shape = dict(state)
    key = next(iter(bad_shape))
    bad_shape[key] = torch.zeros(4, 7)
    with pytest.raises(ValueError, match=r"has shape \(4, 7\), expected"):
        engine.add_adapter("bad-shape", bad_shape, config=CONFIGS["lora"])
    with pytest.raises(ValueError, match=r"has shape \(4, 7\), expected"):
        engine.update_adapter("good", bad_shape)
    with pytest.raises(ValueError, match="is 'loreft' but this engine serves 'lora'"):
        engine.add_adapter("wrong-method", state, config=CONFIGS["loreft"])
    with pytest.raises(ValueError, match="already registered"):
        engine.add_adapter("good", ref)
    with pytest.raises(ValueError, match="unknown adapter 'nobody'"):
        engine.generate([[5, 6, 7]], greedy(), adapters=["nobody"])
    with pytest.raises(ValueError, match="2 adapter names"):
        engine.generate([[5, 6, 7]], greedy(), adapters=["good", None])
    assert "too-big" not in engine.adapters and "bad-shape" not in engine.adapters
    # the engine still serves, with the untouched adapter
    prompt = random_prompt(np.random.default_rng(8), 12)
    out = engine.generate([prompt], greedy(), adapters=["good"])[0]
    assert list(out.outputs[0].token_ids) == reference_greedy(ref, load_tiny(), prompt)
    engine.remove_adapter("good")
    with pytest.raises(ValueError, match="unknown adapter 'good'"):
        engine.generate([prompt], greedy(), adapters=["good"])


def test_text_and_chat_prompts_are_tokenized_like_vllm(engines, tokenizer):
    engine = engines("lora")
    text = "five apples and 12 pears?"
    chat = [{"role": "user", "content": text}]
    outs = engine.generate([text, chat], greedy(max_tokens=2))
    assert outs[0].prompt_token_ids == tokenizer.encode(text)
    assert outs[1].prompt_token_ids == tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], greedy())


def test_a_512_adapter_registry_fits_and_the_513th_is_refused(tiny_llama_dir):
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    registry = AdapterRegistry("lora", shape, max_adapters=512, max_rank=8, dtype=torch.float32, device=torch.device("cpu"))
    config = PreftConfig(method="lora", r=8, target_modules=["q_proj", "v_proj"])
    state = {}
    for layer in range(shape.num_layers):
        for module, d_out in (("q_proj", shape.q_size), ("v_proj", shape.kv_size)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(8, shape.hidden)
            state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, 8)
    for i in range(512):
        registry.add(f"user-{i}", state, config)
    assert registry.capacity == 512 and len(registry.entries) == 512
    assert registry.bytes_per_adapter() * 512 < 256 * 2**20
    with pytest.raises(ValueError, match="the registry is full \\(512 adapters\\)"):
        registry.add("user-512", state, config)
    registry.remove("user-7")
    assert registry.add("user-512", state, config).slot == 7  # a freed slot is reused


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_compiled_engine_applies_adapters(tiny_llama_dir, load_tiny, method):
    """With torch.compile (enforce_eager=False) the adapter ops stay opaque and still act per step."""
    with PreftEngine(str(tiny_llama_dir), max_adapters=4, max_rank=8, method=method, enforce_eager=False, **ENGINE_ARGS) as engine:
        assert engine.llm.llm_engine.vllm_config.compilation_config.mode != 0  # really compiled
        ref = reference_model(load_tiny, method, seed=40)
        engine.add_adapter("compiled", ref)
        rng = np.random.default_rng(9)
        prompts = [random_prompt(rng, n) for n in (150, 12)]
        outs = engine.generate(prompts, greedy(), adapters=["compiled", None])
        base = load_tiny()
        assert list(outs[0].outputs[0].token_ids) == reference_greedy(ref, base, prompts[0])
        assert list(outs[1].outputs[0].token_ids) == reference_greedy(None, base, prompts[1])
        assert engine._runtime.step_log[-1][1] == 0  # the last (decode) step selected nothing
        hooks = engine._runtime.runner.model.preft_hooks
        assert hooks.always and hooks.attached  # the compiled graph was traced with the hooks: they stay


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU sleep() really frees the shared engine's memory")
def test_sleep_and_wake_up_are_logged_no_ops_without_a_gpu(engines, caplog):
    engine = engines("lora")
    with caplog.at_level("WARNING", logger="preft_rl.engine.engine"):
        engine.sleep()
        engine.wake_up()
    assert sum("sleep mode needs a CUDA device" in r.message for r in caplog.records) == 2
    assert engine.generate([[5, 6, 7]], greedy(max_tokens=2))[0].outputs[0].token_ids  # still serving


def test_all_token_baselines_match_peft_lora(tiny_llama_dir, load_tiny, engines, tmp_path):
    """adapter_scope='all' and vLLM's native multi-LoRA both equal an ordinary (all-token) PEFT LoRA."""
    from peft import LoraConfig, get_peft_model

    from preft_rl.engine.baselines import NativeLoraEngine

    engines("lora")  # keep the shared engine alive while these come and go
    ref = reference_model(load_tiny, "lora", seed=50)
    peft_model = get_peft_model(load_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_state = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
    ours = ref.adapter_state_dict()
    assert set(peft_state) == set(ours)  # one key format
    peft_model.load_state_dict({k.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight"): v
                                for k, v in ours.items()}, strict=False)
    peft_model.base_model.model.generation_config.eos_token_id = None
    rng = np.random.default_rng(11)
    prompts = [random_prompt(rng, n) for n in (30, 9)]
    expected = [peft_model.generate(input_ids=torch.tensor([p]), max_new_tokens=GEN, do_sample=False)[0, len(p):].tolist() for p in prompts]
    prefill_only = [reference_greedy(ref, load_tiny(), p) for p in prompts]
    assert expected != prefill_only  # the two policies differ, so the checks below can fail

    with PreftEngine(str(tiny_llama_dir), max_adapters=2, max_rank=8, adapter_scope="all", **ENGINE_ARGS) as engine:
        with pytest.raises(ValueError, match="adapter_scope='prompt' but this engine applies adapters with adapter_scope='all'"):
            engine.add_adapter("all", ref)  # a PreFT adapter is never served at every token by accident
        assert engine.adapters == {}
        all_token = dataclasses.replace(ref.preft_config, adapter_scope="all")
        engine.add_adapter("all", ref.adapter_state_dict(), config=all_token)
        outs = engine.generate(prompts, greedy(), adapters=["all", "all"])
        assert [list(o.outputs[0].token_ids) for o in outs] == expected
        # the HF reference of the same all-token adapter is PEFT's output too
        hf_all = get_preft_model(load_tiny(), all_token)
        hf_all.load_adapter_state_dict(ref.adapter_state_dict())
        hf_all.base_model.generation_config.eos_token_id = None
        assert [hf_all.generate(input_ids=torch.tensor([p]), max_new_tokens=GEN, do_sample=False)[0, len(p):].tolist()
                for p in prompts] == expected
    with NativeLoraEngine(str(tiny_llama_dir), max_adapters=2, max_rank=8, **ENGINE_ARGS) as native:
        native.add_adapter("all", ref)
        outs = native.generate(prompts, greedy(), adapters=["all", "all"])
        assert [list(o.outputs[0].token_ids) for o in outs] == expected
        # a plain PEFT LoRA directory is what this all-token engine serves natively: no opt-in flag needed
        peft_dir = tmp_path / "peft-lora"
        peft_model.save_pretrained(peft_dir)
        native.add_adapter("peft-dir", str(peft_dir))
        outs = native.generate(prompts, greedy(), adapters=["peft-dir", "peft-dir"])
        assert [list(o.outputs[0].token_ids) for o in outs] == expected


def test_a_registry_that_cannot_fit_fails_before_vllm_starts(tiny_llama_dir, monkeypatch):
    import vllm

    starts = []  # vLLM engines started: refused up front means none, not one that loaded the model and then failed

    def counting_llm(*args, **kwargs):
        starts.append(args)
        raise AssertionError("vllm.LLM was started before the registry size was checked")

    monkeypatch.setattr(vllm, "LLM", counting_llm)  # what VllmEngineBase._start_vllm starts
    with pytest.raises(ValueError, match=r"max_adapters=100000000 at max_rank=64 needs up to .* GiB .*lower max_adapters or max_rank"):
        PreftEngine(str(tiny_llama_dir), max_adapters=10**8, max_rank=64, **ENGINE_ARGS)
    assert starts == []


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_engine_through_the_triton_kernels_matches_hf(tiny_llama_dir, method):
    """The CUDA code path of the engine (Triton kernels), run under the Triton interpreter on CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "1", "PREFT_KERNEL_BACKEND": "triton"}
    script = Path(__file__).with_name("engine_triton_check.py")
    out = subprocess.run([sys.executable, str(script), method, str(tiny_llama_dir)], env=env, capture_output=True, text=True, timeout=600)
    found = re.search(r"RESULT (True|False) LAUNCHES (\d+)", out.stdout)
    assert found, out.stdout[-2000:] + out.stderr[-3000:]
    assert found.group(1) == "True", "the engine's tokens through the Triton kernels differ from the HF reference"
    assert int(found.group(2)) > 0, "the engine's adapter ops launched no Triton kernel"


# ---------------------------------------------------------------- request tagging: one rule for the engine and the server
def test_tag_request_sets_the_adapter_and_salt_and_leaves_the_callers_objects_alone():
    from preft_rl.engine import vllm_compat

    params = SamplingParams(max_tokens=3, extra_args={"mine": 1})
    prompt = {"prompt_token_ids": [4, 5, 6, 7, 8]}
    tagged, tagged_params = vllm_compat.tag_request(prompt, params, "user-7", 3)
    assert tagged == {"prompt_token_ids": [4, 5, 6, 7, 8], "cache_salt": "preft:user-7:v3"}
    assert tagged_params.extra_args == {"mine": 1, vllm_compat.EXTRA_ARGS_KEY: {"name": "user-7", "version": 3}}
    assert prompt == {"prompt_token_ids": [4, 5, 6, 7, 8]} and params.extra_args == {"mine": 1}  # untouched
    assert tagged_params.max_tokens == 3
    # a client's own salt is kept, after the adapter's: it can never stand alone
    salted, _ = vllm_compat.tag_request({**prompt, "cache_salt": "c"}, params, "user-7", 3)
    assert salted["cache_salt"] == "preft:user-7:v3:client:c"
    # adapter and version change the salt; what the adapter did at each token is in each block's own key
    salts = {vllm_compat.tag_request({"prompt_token_ids": [1, 2]}, params, name, version)[0]["cache_salt"]
             for name, version in [("a", 1), ("b", 1), ("a", 2)]}
    assert len(salts) == 3
    # a multi-turn prompt's sampled spans move from the prompt to the tag (flat), with a ReFT adapter's last-M window
    spans, spans_params = vllm_compat.tag_request({**prompt, "sampled_spans": [(1, 3)]}, params, "user-7", 3, last_m=2)
    assert spans == tagged and spans_params.extra_args[vllm_compat.EXTRA_ARGS_KEY] == {
        "name": "user-7", "version": 3, "sampled": [1, 3], "last_m": 2}
    with pytest.raises(ValueError, match="needs a tokenised prompt"):
        vllm_compat.tag_request({"prompt": "text"}, params, "a", 1)


def test_engine_and_server_tag_a_request_the_same_way(engines, load_tiny, monkeypatch):
    """What PreftEngine.generate submits to vLLM and what `preft-rl serve`'s routing submits, for the same adapter,
    version and prompt: the same extra_args and the same cache salt."""
    import asyncio
    import types

    from preft_rl.engine import vllm_compat_serve
    from preft_rl.engine.server.adapters import ServedAdapters, ServeSettings
    from preft_rl.engine.server.plugins import install_request_routing

    engine = engines("lora")
    engine.add_adapter("tagged", reference_model(load_tiny, "lora", seed=31))
    engine.update_adapter("tagged", reference_model(load_tiny, "lora", seed=32).adapter_state_dict())  # version 2
    prompt = random_prompt(np.random.default_rng(7), 9)
    submitted = {}

    def engine_submit(requests, params, use_tqdm=True):
        submitted["engine"] = (requests[0], params[0])
        return []

    monkeypatch.setattr(engine.llm, "generate", engine_submit)
    engine.generate([prompt], greedy(), adapters=["tagged"])

    async def server_submit(prompt, sampling_params, request_id, *args, lora_request=None, **kwargs):
        submitted["server"] = (prompt, sampling_params)
        yield "out"

    client = types.SimpleNamespace(generate=server_submit)
    served = ServedAdapters(client, ServeSettings(method="lora", max_adapters=2, max_rank=8, model_class="x"), ["tiny"])
    served.entries["tagged"] = engine.adapters["tagged"]
    monkeypatch.setattr(vllm_compat_serve, "patch_serving_checks", lambda *a: None)  # no vLLM server class in this test
    install_request_routing(client, served)
    lora = vllm_compat_serve.adapter_request_class()(lora_name="tagged", lora_int_id=1, lora_path="/unused")

    async def run():
        return [out async for out in client.generate({"prompt_token_ids": prompt}, greedy(), "r1", lora_request=lora)]

    assert asyncio.run(run()) == ["out"]
    (engine_prompt, engine_params), (server_prompt, server_params) = submitted["engine"], submitted["server"]
    assert engine_prompt == server_prompt == {"prompt_token_ids": prompt, "cache_salt": "preft:tagged:v2"}
    assert engine_params.extra_args == server_params.extra_args == {"preft_adapter": {"name": "tagged", "version": 2}}
    engine.remove_adapter("tagged")
