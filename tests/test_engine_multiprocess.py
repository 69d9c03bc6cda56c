"""PreftEngine with vLLM in its own engine-core process (`multiprocess=True`): the adapter registry, the token
selection and the hooks live in vLLM's worker (preft_rl/engine/worker.py) and are driven through collective_rpc, so
the engine serves exactly what it serves in-process, and refuses bad adapters with the same errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from preft_rl.engine import PreftEngine  # noqa: E402
from conftest import ENGINE_ARGS  # noqa: E402
from test_engine import greedy, random_prompt, reference_greedy, reference_model  # noqa: E402
from test_multiturn import check_origin_marks_split_the_prefix_cache, multiturn_rollout  # noqa: E402
from test_reliability_engine import check_a_bad_adapter_fails_alone  # noqa: E402


def test_multiprocess_engine_serves_updates_and_refuses_like_in_process(tiny_llama_dir, load_tiny):
    rng = np.random.default_rng(5)
    prompts = [random_prompt(rng, 9), random_prompt(rng, 14), random_prompt(rng, 11)]
    base = load_tiny()
    engine = PreftEngine(str(tiny_llama_dir), max_adapters=4, max_rank=8, method="lora", multiprocess=True, **ENGINE_ARGS)
    try:
        assert engine._runner is None  # nothing of vLLM's worker lives in this process
        with pytest.raises(RuntimeError, match="worker process"):
            engine.registry  # noqa: B018
        first = reference_model(load_tiny, "lora", seed=3)
        entry = engine.add_adapter("mp", first)
        outs = engine.generate(prompts, greedy(), adapters=["mp", None, "mp"])
        assert [list(o.outputs[0].token_ids) for o in outs] == [
            reference_greedy(first, base, prompts[0]), reference_greedy(None, base, prompts[1]), reference_greedy(first, base, prompts[2])]

        second = reference_model(load_tiny, "lora", seed=4)
        updated = engine.update_adapter("mp", second.adapter_state_dict())
        assert updated.version == entry.version + 1 == engine.adapters["mp"].version
        expected = reference_greedy(second, base, prompts[0])
        assert expected != reference_greedy(first, base, prompts[0])  # the update is visible in the tokens
        assert list(engine.generate(prompts[:1], greedy(), adapters=["mp"])[0].outputs[0].token_ids) == expected

        bad = dict(second.adapter_state_dict())
        key = next(iter(bad))
        bad[key] = bad[key][..., :1]
        with pytest.raises(ValueError, match=r"has shape .* expected"):  # the worker's registry refuses it, by name
            engine.update_adapter("mp", bad)
        assert engine.adapters["mp"].version == updated.version  # nothing changed
        assert list(engine.generate(prompts[:1], greedy(), adapters=["mp"])[0].outputs[0].token_ids) == expected
        with pytest.raises(ValueError, match="unknown adapter 'nope'"):
            engine.generate(prompts[:1], greedy(), adapters=["nope"])
        with pytest.raises(KeyError, match="unknown adapter 'nope'"):
            engine.update_adapter("nope", second.adapter_state_dict())
        with pytest.raises(ValueError, match="already registered"):
            engine.add_adapter("mp", first)
        # a bad adapter fails only its own requests; vLLM's engine-core process keeps serving (it used to die)
        check_a_bad_adapter_fails_alone(engine, load_tiny, 80)
        assert list(engine.generate(prompts[:1], greedy(), adapters=["mp"])[0].outputs[0].token_ids) == expected
        # multi-turn (DESIGN invariant 9) in the engine-core process: sampled spans plain, the prefix cache split on marks
        multiturn_rollout(engine, {None: None, "mp": second}, base, [("mp", prompts[0]), (None, prompts[1])], 2, rng,
                          single_turn=["mp"])
        check_origin_marks_split_the_prefix_cache(engine, "mp", second, base)
        engine.remove_adapter("mp")
        assert "mp" not in engine.adapters
        assert list(engine.generate(prompts[1:2], greedy())[0].outputs[0].token_ids) == reference_greedy(None, base, prompts[1])
    finally:
        engine.close()
