"""Engine probes from the reliability sweep (issue 14): nothing wrong is ever served, every refused input
leaves the engine as it was. Uses the session's shared engines (tests/conftest.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from preft_rl import PreftConfig

vllm = pytest.importorskip("vllm")

from preft_rl.engine.registry import AdapterRegistry, ModelShape  # noqa: E402
from test_engine import CONFIGS, greedy, random_prompt, reference_greedy, reference_model  # noqa: E402


def served(engine, prompt: list[int], name: str | None) -> list[int]:
    return list(engine.generate([prompt], greedy(), adapters=[name])[0].outputs[0].token_ids)


def test_remove_then_add_under_the_same_name_never_serves_the_old_prompt_cache(engines, load_tiny):
    """A prompt longer than one KV block (128 tokens) is cached under the adapter's salt; re-adding the name
    with other weights must not hit that cache (the version used to restart at 1, so the salt repeated)."""
    engine = engines("lora")
    old, new = reference_model(load_tiny, "lora", seed=61), reference_model(load_tiny, "lora", seed=62)
    base = load_tiny()
    prompt = random_prompt(np.random.default_rng(61), 300)
    assert reference_greedy(old, base, prompt) != reference_greedy(new, base, prompt)  # so the check below can fail

    first = engine.add_adapter("reused-name", old)
    assert served(engine, prompt, "reused-name") == reference_greedy(old, base, prompt)
    engine.remove_adapter("reused-name")
    second = engine.add_adapter("reused-name", new)
    assert second.version > first.version  # versions never repeat for a name
    out = engine.generate([prompt], greedy(), adapters=["reused-name"])[0]
    assert out.num_cached_tokens == 0
    assert list(out.outputs[0].token_ids) == reference_greedy(new, base, prompt)
    # and after an update of the re-added adapter, the cache of its first life is still never hit
    engine.update_adapter("reused-name", old.adapter_state_dict())
    engine.remove_adapter("reused-name")
    engine.add_adapter("reused-name", new)
    out = engine.generate([prompt], greedy(), adapters=["reused-name"])[0]
    assert out.num_cached_tokens == 0
    assert list(out.outputs[0].token_ids) == reference_greedy(new, base, prompt)
    engine.remove_adapter("reused-name")


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_update_with_a_partial_state_dict_is_refused_and_changes_nothing(engines, load_tiny, method):
    engine = engines(method)
    ref = reference_model(load_tiny, method, seed=63)
    entry = engine.add_adapter(f"partial-{method}", ref)
    prompt = random_prompt(np.random.default_rng(63), 20)
    before = served(engine, prompt, f"partial-{method}")

    other = reference_model(load_tiny, method, seed=64).adapter_state_dict()
    layer0 = {k: v for k, v in other.items() if ".layers.0." in k}
    with pytest.raises(ValueError, match=r"missing \d+ tensors.*layers\.1\..*pass every tensor"):
        engine.update_adapter(f"partial-{method}", layer0)
    assert engine.adapters[f"partial-{method}"].version == entry.version
    assert served(engine, prompt, f"partial-{method}") == before == reference_greedy(ref, load_tiny(), prompt)
    # one missing tensor is enough, and the error names it
    key = sorted(other)[-1]
    with pytest.raises(ValueError, match=f"missing 1 tensors.*{key}"):
        engine.update_adapter(f"partial-{method}", {k: v for k, v in other.items() if k != key})
    # a full state dict is still accepted
    assert engine.update_adapter(f"partial-{method}", other).version == entry.version + 1
    engine.remove_adapter(f"partial-{method}")


def test_add_with_fewer_tensors_than_the_config_describes_is_refused(engines, load_tiny):
    engine = engines("lora")
    state = reference_model(load_tiny, "lora", seed=65).adapter_state_dict()
    layer0 = {k: v for k, v in state.items() if ".layers.0." in k}
    with pytest.raises(ValueError, match=r"missing \d+ tensors.*layers\.1\."):
        engine.add_adapter("too-few", layer0, config=CONFIGS["lora"])  # config: all-linear on every layer
    assert "too-few" not in engine.adapters
    # a target list describes fewer modules: exactly those are expected
    only_q = {k: v for k, v in state.items() if ".q_proj." in k}
    engine.add_adapter("only-q", only_q, config=PreftConfig(method="lora", r=4, alpha=8, target_modules=["q_proj"]))
    engine.remove_adapter("only-q")


def test_peft_full_path_targets_expect_exactly_their_tensors(engines, load_tiny):
    """PEFT saves target_modules as full paths ('model.layers.1.self_attn.q_proj'). Those are matched per layer, so a
    state without one targeted module's tensors is refused (it used to pass: only A-without-B pairs were checked, and
    the module was served with a zero delta)."""
    from preft_rl import get_preft_model

    engine = engines("lora")
    targets = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    config = PreftConfig(method="lora", r=4, alpha=8, target_modules=targets)
    state = get_preft_model(load_tiny(), config).adapter_state_dict()
    assert sorted({k.split(".lora_")[0] for k in state}) == [
        "base_model.model.model.layers.0.mlp.down_proj", "base_model.model.model.layers.1.self_attn.q_proj"]
    layer0 = {k: v for k, v in state.items() if ".layers.0." in k}
    with pytest.raises(ValueError, match=r"missing 2 tensors.*layers\.1\.self_attn\.q_proj"):
        engine.add_adapter("full-paths", layer0, config=config)
    assert "full-paths" not in engine.adapters
    engine.add_adapter("full-paths", state, config=config)  # the whole adapter is taken
    engine.remove_adapter("full-paths")


def test_non_finite_scaling_or_tensors_are_refused_and_other_requests_stay_exact(engines, load_tiny):
    engine = engines("lora")
    good = reference_model(load_tiny, "lora", seed=66)
    engine.add_adapter("finite-good", good)
    state = good.adapter_state_dict()
    config = PreftConfig(method="lora", r=4, alpha=8)
    config.alpha = math.inf  # changed after validation: the engine checks again
    with pytest.raises(ValueError, match=r"alpha=inf"):
        engine.add_adapter("inf-scaling", state, config=config)
    assert "inf-scaling" not in engine.adapters

    key = sorted(state)[3]
    for bad_value in (math.nan, math.inf):
        bad = dict(state)
        bad[key] = state[key].clone()
        bad[key][0, 0] = bad_value
        with pytest.raises(ValueError, match=f"tensor {key} has non-finite values"):
            engine.add_adapter("nan-adapter", bad, config=CONFIGS["lora"])
        with pytest.raises(ValueError, match=f"tensor {key} has non-finite values"):
            engine.update_adapter("finite-good", bad)
    assert "nan-adapter" not in engine.adapters and engine.adapters["finite-good"].version == 1
    base = load_tiny()
    prompts = [random_prompt(np.random.default_rng(66), n) for n in (200, 15)]
    outs = engine.generate(prompts, greedy(), adapters=["finite-good", None])
    assert [list(o.outputs[0].token_ids) for o in outs] == [reference_greedy(good, base, prompts[0]), reference_greedy(None, base, prompts[1])]
    engine.remove_adapter("finite-good")


def test_tensors_that_overflow_the_engine_dtype_are_refused(tiny_llama_dir, load_tiny):
    """1e5 is finite in fp32 but inf in fp16: the registry checks the values it would actually serve."""
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))
    registry = AdapterRegistry("lora", shape, max_adapters=2, max_rank=4, dtype=torch.float16, device=torch.device("cpu"))
    state = reference_model(load_tiny, "lora", seed=67).adapter_state_dict()
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key][0, 0] = 1e5
    with pytest.raises(ValueError, match=f"tensor {key} .*float16"):
        registry.add("overflow", state, CONFIGS["lora"])
    assert not registry.entries
    assert all(int(t.count_nonzero()) == 0 for t in registry.tensors.values())


def test_a_chat_message_without_a_role_is_named_before_the_template_runs(tokenizer):
    from preft_rl.engine.engine import prompt_token_ids

    with pytest.raises(ValueError, match=r"chat message 1 of a prompt is \{'content': 'hi'\}; every message needs a string 'role'"):
        prompt_token_ids(tokenizer, [{"role": "system", "content": "be brief"}, {"content": "hi"}])


def overflowing_adapter(load_tiny, seed: int, scale: float = 1e30):
    """Finite but huge weights (B x 1e30): they pass every file check, yet the prompt activations overflow to inf/NaN."""
    huge = reference_model(load_tiny, "lora", seed=seed)
    with torch.no_grad():
        for name, param in huge.adapter_named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    return huge


def check_a_bad_adapter_fails_alone(engine, load_tiny, seed: int, kv_caches=None) -> None:
    """DESIGN invariant 8 on one engine (any mode): a request whose adapter overflows fails alone, with an error naming
    the adapter and no token; every other request of the call and every later one is exactly the reference; the
    adapter is refused until it is updated, and then serves its new weights exactly; a long prompt of a good adapter
    still hits the prefix cache; `kv_caches()` (in-process only) holds nothing non-finite afterwards."""
    from preft_rl.engine import FailedRequestsError

    good, fixed = reference_model(load_tiny, "lora", seed=seed + 1), reference_model(load_tiny, "lora", seed=seed + 2)
    engine.add_adapter("overflow", overflowing_adapter(load_tiny, seed))
    engine.add_adapter("good", good)
    base = load_tiny()
    rng = np.random.default_rng(seed)
    prompts = [random_prompt(rng, n) for n in (150, 40, 90, 150)]
    expected = [None, reference_greedy(good, base, prompts[1]), reference_greedy(None, base, prompts[2]),
                reference_greedy(good, base, prompts[3])]
    try:
        with pytest.raises(FailedRequestsError, match=r"adapter 'overflow' produced non-finite activations") as caught:
            engine.generate(prompts, greedy(), adapters=["overflow", "good", None, "good"])
        assert caught.value.failed == [0] and caught.value.adapters == ["overflow"]
        outs = caught.value.outputs
        assert outs[0].outputs[0].finish_reason == "error" and list(outs[0].outputs[0].token_ids) == []
        for i in (1, 2, 3):  # the rest of the same call: exactly what they get without the bad adapter
            assert list(outs[i].outputs[0].token_ids) == expected[i], i
        with pytest.raises(ValueError, match=r"adapter 'overflow' \(version 1\) produced non-finite activations .* refused"):
            engine.generate(prompts[:1], greedy(), adapters=["overflow"])
        later = engine.generate(prompts[1:] * 2, greedy(), adapters=["good", None, "good"] * 2)
        for i, out in enumerate(later):
            assert list(out.outputs[0].token_ids) == expected[1 + i % 3], i
        assert later[2].num_cached_tokens >= 128  # the good adapter's long prompt: its cached block is still used
        if kv_caches is not None:
            assert all(bool(torch.isfinite(cache).all()) for cache in kv_caches())
        engine.update_adapter("overflow", fixed.adapter_state_dict())  # a new version: served again, exactly
        assert served(engine, prompts[0], "overflow") == reference_greedy(fixed, base, prompts[0])
    finally:
        engine.remove_adapter("overflow")
        engine.remove_adapter("good")


def test_an_adapter_whose_activations_overflow_fails_alone_in_process(engines, load_tiny):
    """Before: the whole generate call failed (in-process) or vLLM's engine core died (other modes)."""
    from preft_rl.engine import vllm_compat

    engine = engines("lora")
    check_a_bad_adapter_fails_alone(engine, load_tiny, 70, lambda: vllm_compat.kv_cache_tensors(engine._runner))


def test_integer_adapter_tensors_are_refused_by_the_engine(engines, load_tiny):
    engine = engines("lora")
    state = reference_model(load_tiny, "lora", seed=72).adapter_state_dict()
    key = sorted(state)[0]
    with pytest.raises(TypeError, match=rf"tensor {key} has dtype torch.int64; adapter weights are floating point"):
        engine.add_adapter("ints", {**state, key: state[key].round().long()}, config=CONFIGS["lora"])
    assert "ints" not in engine.adapters
