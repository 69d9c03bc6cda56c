"""The contract of preft_rl/engine/vllm_compat.py: what it reads from vLLM's private state is right.

If a vLLM upgrade moves these fields, this file fails first and says where.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from preft_rl.engine import vllm_compat  # noqa: E402


def test_version_guard_names_the_fix(monkeypatch):
    monkeypatch.setattr(vllm_compat.vllm, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="install vllm==0.32.0"):
        vllm_compat.check_vllm_version()


def test_batch_layout_positions_equal_the_positions_vllm_feeds_the_model(engines):
    """Host-side (request, position) per token must equal vLLM's own `positions` input, in mixed
    prefill/decode/chunked steps, and the extra_args must reach the runner's request state."""
    engine = engines("lora")
    model = engine._runner.model
    seen = []
    cls = type(model)
    original = cls.forward

    def spy(self, input_ids, positions, *args, **kwargs):
        if self.preft_runtime is not None and self.preft_runtime.in_step:
            layout = vllm_compat.batch_layout(engine._runner)
            req_index, host_positions = layout.token_positions()
            extra = [vllm_compat.request_extra_args(engine._runner, r).get("tag") for r in layout.req_ids]
            seen.append((host_positions, positions[: layout.num_tokens].numpy().copy(), layout, extra))
        return original(self, input_ids, positions, *args, **kwargs)

    cls.forward = spy
    try:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(7, 380, size=n).tolist() for n in (5, 60, 150)]
        params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, extra_args={"tag": i}) for i in range(3)]
        engine.generate(prompts, params)
    finally:
        cls.forward = original
    assert len(seen) >= 6
    def mixed(host_positions, layout):
        req_index, _ = layout.token_positions()
        is_prompt = host_positions < layout.num_prompt[req_index]
        return is_prompt.any() and (~is_prompt).any()

    assert any(mixed(host, layout) for host, _, layout, _ in seen), "no mixed prefill/decode step was seen"
    for host_positions, vllm_positions, layout, extra in seen:
        np.testing.assert_array_equal(host_positions, vllm_positions)
        assert sorted(layout.num_prompt.tolist()) == sorted(len(p) for p, tag in zip(prompts, range(3)) if tag in extra)
        assert all(tag in (0, 1, 2) for tag in extra)


def test_kv_cache_tensors_are_the_runners_caches(engines):
    """A failed request's KV blocks are zeroed in these (zero_request_kv_blocks): they must be the real KV cache, one
    tensor per attention layer."""
    from preft_rl.engine import vllm_compat

    engine = engines("lora")
    caches = vllm_compat.kv_cache_tensors(engine._runner)
    assert len(caches) == engine.llm.llm_engine.model_config.hf_config.num_hidden_layers
    assert all(c.is_floating_point() and c.numel() > 0 for c in caches)
