"""Slots as a cache (issue 32, engine side): more adapters registered than the engine has slots.

The registry's bookkeeping alone (least-recently-used eviction, versions, errors), then PreftEngine with 3 slots and
8 adapters: one batch naming every adapter (the scheduler holds prompts back while their adapters would not fit the
slots), each request's greedy tokens equal to its own adapter's HF
reference; an adapter updated while it waits in host memory serves its new weights, never the old version's KV.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ENGINE_ARGS, random_adapter_model
from preft_rl import PreftConfig
from preft_rl.engine.registry import AdapterRegistry, ModelShape

CONFIG = PreftConfig(method="lora", r=4, alpha=8)


def tiny_registry(tokenizer_free_shape: ModelShape, slots: int, registered: int) -> AdapterRegistry:
    return AdapterRegistry("lora", tokenizer_free_shape, slots, 4, torch.float32, torch.device("cpu"),
                           max_registered=registered)


@pytest.fixture
def shape(tiny_llama_dir):
    from transformers import AutoConfig

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir))


def lora_state(load_tiny, seed: int) -> dict[str, torch.Tensor]:
    return random_adapter_model(load_tiny, CONFIG, seed).adapter_state_dict()


def test_the_least_recently_used_adapter_not_needed_gives_up_its_slot(shape, load_tiny):
    registry = tiny_registry(shape, slots=2, registered=4)
    states = {name: lora_state(load_tiny, seed) for seed, name in enumerate("abcd")}
    for name in "abcd":
        registry.add(name, states[name], CONFIG)
    assert {n: e.slot for n, e in registry.entries.items()} == {"a": 0, "b": 1, "c": -1, "d": -1}  # c, d wait on the host
    before = {k: v.clone() for k, v in registry.tensors.items()}
    assert registry.make_resident(["b", "c"]) == 1  # c takes a's slot (a: least recently used, not needed)
    assert (registry.entries["a"].slot, registry.entries["c"].slot) == (-1, 0)
    assert any(not torch.equal(before[k], registry.tensors[k]) for k in before)
    assert registry.make_resident(["a"]) == 1 and registry.entries["a"].slot == 1  # b is now the oldest of b, c
    assert registry.make_resident(["a", "c"]) == 0  # both already in slots: nothing written
    # a slot's tensors are those the adapter would have alone (a reload writes exactly what add wrote)
    alone = tiny_registry(shape, slots=2, registered=2)
    alone.add("a", states["a"], CONFIG)
    for key, tensor in alone.tensors.items():
        torch.testing.assert_close(registry.tensors[key].select(0, 1) if tensor.dim() else tensor,
                                   tensor.select(0, 0) if tensor.dim() else tensor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 adapters are needed in one step but the engine has 2 slots"):
        registry.make_resident(["a", "b", "c"])
    with pytest.raises(ValueError, match="the registry is full \\(4 adapters\\).*max_cpu_adapters"):
        registry.add("e", states["a"], CONFIG)
    # an update while on the host: a new version, and the new weights are what a reload writes
    version = registry.entries["b"].version
    registry.update("b", states["d"])
    assert registry.entries["b"].version == version + 1 and registry.entries["b"].slot == -1
    registry.remove("c")
    assert "c" not in registry.host and "c" not in registry.recent
    with pytest.raises(ValueError, match="max_cpu_adapters=1 must be >= max_adapters=2"):
        tiny_registry(shape, slots=2, registered=1)


def test_a_registry_without_caching_keeps_todays_rules(shape, load_tiny):
    registry = tiny_registry(shape, slots=2, registered=2)
    registry.add("a", lora_state(load_tiny, 0), CONFIG)
    registry.add("b", lora_state(load_tiny, 1), CONFIG)
    assert not registry.caching and registry.host == {}  # no host copies without caching
    with pytest.raises(ValueError, match="the registry is full \\(2 adapters\\).*max_cpu_adapters"):
        registry.add("c", lora_state(load_tiny, 2), CONFIG)


def test_one_worker_call_swaps_many_adapters_each_refused_alone(shape, load_tiny):
    """The worker RPC behind the server's batched --adapter-dir loads: removals first (they make the room), then each
    add applied or refused on its own; what it reports is plain data every rank must agree on."""
    import dataclasses

    from preft_rl.engine.worker import PreftWorkerExtension, pack_state

    registry = tiny_registry(shape, slots=2, registered=3)
    worker = PreftWorkerExtension()
    worker._preft_registry = lambda: registry
    states = {name: pack_state(name, lora_state(load_tiny, seed)) for seed, name in enumerate("abcd")}
    config = dataclasses.asdict(CONFIG)
    first = worker.preft_swap_adapters([], [[n, states[n], config] for n in "abc"])
    assert first["removed"] == [] and [first["added"][n]["version"] for n in "abc"] == [1, 1, 1]
    wrong = {**config, "r": 8}  # the server checked the rank against the files; the worker checks again
    second = worker.preft_swap_adapters(["a", "b", "gone"], [["a", states["d"], config], ["x", states["d"], wrong],
                                                             ["d", states["d"], config]])
    assert second["removed"] == ["a", "b"] and second["added"]["a"]["version"] == 2  # reloaded: a new version
    assert second["added"]["x"]["error"] == "ValueError" and "x" not in registry.entries
    assert sorted(registry.entries) == ["a", "c", "d"] and registry.entries["d"].version == 1
    a_host, d_host = registry.host["a"][0], registry.host["d"][0]
    assert a_host.keys() == d_host.keys() and all(torch.equal(a_host[k], d_host[k]) for k in a_host)  # a holds d's weights


@pytest.mark.parametrize("mode", ["in-process", "multiprocess", "tp2"])
def test_eight_adapters_on_three_slots_each_request_gets_its_own_adapter(tiny_llama_dir, load_tiny, mode):
    from vllm import SamplingParams

    from preft_rl.engine import PreftEngine
    from test_engine import reference_greedy

    extra = {"multiprocess": True} if mode == "multiprocess" else {"tensor_parallel_size": 2} if mode == "tp2" else {}
    engine = PreftEngine(str(tiny_llama_dir), max_adapters=3, max_cpu_adapters=8, max_rank=8, **extra, **ENGINE_ARGS)
    try:
        refs = {f"user-{i}": random_adapter_model(load_tiny, CONFIG, seed=40 + i) for i in range(8)}
        for name, model in refs.items():
            engine.add_adapter(name, model)
        assert sorted(e.slot for e in engine.adapters.values()) == [-1] * 5 + [0, 1, 2]
        rng = np.random.default_rng(3)
        names = [f"user-{i % 8}" for i in (0, 5, 1, 7, 2, 6, 3, 4, 0, 7)] + [None]
        prompts = [rng.integers(7, 380, size=int(n)).tolist() for n in rng.integers(6, 40, size=len(names))]
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outs = engine.generate(prompts, params, adapters=names)
        base = load_tiny()
        for name, prompt, out in zip(names, prompts, outs):  # never another adapter's output
            assert out.prompt_token_ids == prompt
            assert list(out.outputs[0].token_ids) == reference_greedy(refs.get(name), base, prompt, 6), name
        stats = engine.cache_stats()
        assert stats["registered"] == 8 and stats["resident"] == 3 and stats["loads"] >= 5
        # an adapter updated while it waits on the host: its new weights, never the old version's cached prompt KV
        waiting = next(name for name, entry in engine.adapters.items() if entry.slot == -1)
        engine.generate([prompts[0]], params, adapters=[waiting])  # its prompt KV cached under the old version
        new = random_adapter_model(load_tiny, CONFIG, seed=99)
        engine.update_adapter(waiting, new.adapter_state_dict())
        for name in [n for n in refs if n != waiting][:3]:  # push it out of its slot again
            engine.generate([prompts[1]], params, adapters=[name])
        [out] = engine.generate([prompts[0]], params, adapters=[waiting])
        assert list(out.outputs[0].token_ids) == reference_greedy(new, base, prompts[0], 6)
    finally:
        engine.close()


def test_the_scheduler_starts_a_prompt_only_while_its_adapter_fits_the_slots():
    import doctest

    from preft_rl.engine import vllm_compat
    from preft_rl.engine.vllm_compat import admits_adapter

    assert doctest.testmod(vllm_compat).failed == 0
    prefilling = [{"name": "a", "slots": 2}, {"name": "b", "slots": 2}, None]  # None: a base-model request
    assert not admits_adapter({"name": "c", "slots": 2}, prefilling)  # a third adapter waits a step
    assert admits_adapter({"name": "b", "slots": 2}, prefilling)  # one already computing a prompt: no new slot
    assert admits_adapter({"name": "c", "slots": 3}, prefilling)
    assert admits_adapter({"name": "c"}, prefilling) and admits_adapter(None, prefilling)  # no caching: as before
