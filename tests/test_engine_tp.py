"""PreftEngine with tensor parallelism (TP=2, one vLLM worker process per rank, on CPU): every rank keeps its shard
of each adapter (LoRA B rows for qkv / gate_up, A columns for o_proj / down_proj, whose partial deltas are summed over
the ranks; ReFT replicated), and the greedy tokens equal the HF reference, hence TP=1, in mixed batches of adapters
and no-adapter requests, before and after an update."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from preft_rl.engine import PreftEngine  # noqa: E402
from preft_rl.engine.registry import ModelShape  # noqa: E402
from conftest import ENGINE_ARGS  # noqa: E402
from test_engine import CONFIGS, greedy, random_prompt, reference_greedy, reference_model  # noqa: E402
from test_multiturn import check_origin_marks_split_the_prefix_cache, multiturn_rollout  # noqa: E402
from test_reliability_engine import check_a_bad_adapter_fails_alone  # noqa: E402


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_tp2_engine_equals_the_hf_reference_in_mixed_batches(tiny_llama_dir, load_tiny, method):
    rng = np.random.default_rng(7)
    prompts = [random_prompt(rng, n) for n in (9, 13, 6, 11)]
    base = load_tiny()
    refs = {f"tp-{i}": reference_model(load_tiny, method, seed=20 + i) for i in range(2)}
    engine = PreftEngine(str(tiny_llama_dir), max_adapters=4, max_rank=8, method=method, tensor_parallel_size=2, **ENGINE_ARGS)
    try:
        for name, model in refs.items():
            engine.add_adapter(name, model)
        names = ["tp-0", None, "tp-1", "tp-0"]
        outs = engine.generate(prompts, greedy(), adapters=names)
        expected = [reference_greedy(refs[n] if n else None, base, p) for n, p in zip(names, prompts)]
        assert [list(o.outputs[0].token_ids) for o in outs] == expected

        newer = reference_model(load_tiny, method, seed=30)
        engine.update_adapter("tp-1", newer.adapter_state_dict())
        assert engine.adapters["tp-1"].version == 2
        want = reference_greedy(newer, base, prompts[2])
        assert want != expected[2]
        assert list(engine.generate(prompts[2:3], greedy(), adapters=["tp-1"])[0].outputs[0].token_ids) == want
        if method == "lora":  # a bad adapter fails only its own requests, on both ranks alike
            check_a_bad_adapter_fails_alone(engine, load_tiny, 90)
            assert list(engine.generate(prompts[2:3], greedy(), adapters=["tp-1"])[0].outputs[0].token_ids) == want
        # multi-turn (DESIGN invariant 9): sampled spans stay plain on every rank; the prefix cache splits on origin marks
        multiturn_rollout(engine, {None: None, "tp-0": refs["tp-0"], "tp-1": newer}, base,
                          [("tp-0", prompts[0]), ("tp-1", prompts[1]), (None, prompts[3])], 2, rng, single_turn=["tp-0"])
        check_origin_marks_split_the_prefix_cache(engine, "tp-0", refs["tp-0"], base)
    finally:
        engine.close()


def test_lora_shards_partition_the_whole_tensors(tiny_llama_dir):
    """Rank shards of every LoRA tensor put back together give the whole tensor (B rows / A columns, once each)."""
    import torch
    from transformers import AutoConfig

    from preft_rl.adapters.methods.lora import shard_lora_tensor

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    shapes = [ModelShape.from_hf_config(config, rank, 2) for rank in range(2)]
    whole = ModelShape.from_hf_config(config)
    for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        d_in, slices = whole.lora_io_full(module)
        a = torch.randn(4, d_in)
        parts = [shard_lora_tensor(s, module, "A", 0, a) for s in shapes]
        assert torch.equal(torch.cat(parts, 1) if module in ("self_attn.o_proj", "mlp.down_proj") else parts[0], a)
        for index, rows in enumerate(slices):
            b = torch.randn(rows, 4)
            parts = [shard_lora_tensor(s, module, "B", index, b) for s in shapes]
            assert torch.equal(parts[0] if module in ("self_attn.o_proj", "mlp.down_proj") else torch.cat(parts), b)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide"):
        ModelShape.from_hf_config(config, 0, 3)
    assert CONFIGS["lora"].target_modules == "all-linear"  # the engine test above covers o_proj and down_proj
