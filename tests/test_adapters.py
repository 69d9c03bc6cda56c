"""Invariants of prefill-only adapters on the Hugging Face reference path (DESIGN.md, invariants 1-3).

Every test runs for LoRA, LoReFT and DiReFT, in fp32 and bf16, with left and right padding.
"""

from __future__ import annotations

import pytest
import torch

from preft_rl import PreftConfig, get_preft_model, prompt_mask_from_lengths
from preft_rl.adapters.layers import DiReftIntervention, LoReftIntervention, PreftLoraLinear
from preft_rl.adapters.masks import reft_position_mask

METHOD_CONFIGS = {
    "lora": dict(method="lora", r=4, alpha=8, target_modules="all-linear"),
    "loreft": dict(method="loreft", r=4, layers=[0, 1], positions="f2+l2"),
    "direft": dict(method="direft", r=4, layers="all", positions="all"),
}
DTYPES = [torch.float32, torch.bfloat16]
# Incremental decoding vs one full forward: different matmul shapes round differently. Bound on the max
# |logit difference| per row; measured on this model at <= 5.2e-6 in fp32 and <= 0.047 in bf16.
LOGIT_ATOL = {torch.float32: 2e-5, torch.bfloat16: 0.0625}

PROMPTS = ["five apples and 12 pears?", "how many books", "she buys 3 coins then sells two cats each day"]
COMPLETIONS = [" the answer is 7", " more than 40 books", " 9"]

params_all = pytest.mark.parametrize(
    "method,dtype,padding",
    [(m, d, p) for m in METHOD_CONFIGS for d in DTYPES for p in ("left", "right")],
    ids=lambda v: str(v).replace("torch.", ""),
)


def make_preft(load_tiny, method: str, dtype: torch.dtype, seed: int = 0, **overrides):
    config = PreftConfig(**{**METHOD_CONFIGS[method], **overrides}, seed=seed)
    return get_preft_model(load_tiny(dtype), config)


def randomize_adapter(model, scale: float = 0.3, seed: int = 1) -> None:
    """Give every adapter tensor non-zero values, so the adapter really changes the prompt's hidden states."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.adapter_named_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)


def batch(tokenizer, padding: str, with_completion: bool = True):
    """Token batch of prompt (+ completion) with the given padding, and its prompt mask."""
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    comp_ids = [tokenizer(c).input_ids for c in COMPLETIONS] if with_completion else [[] for _ in PROMPTS]
    seqs = [p + c for p, c in zip(prompt_ids, comp_ids)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    am = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if padding == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s)
        am[i, cols] = 1
    prompt_mask = prompt_mask_from_lengths(am, [len(p) for p in prompt_ids])
    return ids, am, prompt_mask


# ------------------------------------------------------------------------------------------- 1
@params_all
def test_completion_positions_match_base_module_outputs_exactly(load_tiny, tokenizer, method, dtype, padding):
    model = make_preft(load_tiny, method, dtype)
    randomize_adapter(model)
    ids, am, pm = batch(tokenizer, padding)
    completion = am.bool() & ~pm
    checked, differ_at_prompt = 0, 0

    captured = []
    handles = []
    for module in model.base_model.modules():
        if isinstance(module, PreftLoraLinear):
            # compare the adapted module's output with its own base layer's output on the same input
            handles.append(module.base_layer.register_forward_hook(lambda m, a, o: captured.append(("base", o))))
            handles.append(module.register_forward_hook(lambda m, a, o: captured.append(("adapted", o))))
        if hasattr(module, "preft_reft"):
            handles.append(module.register_forward_hook(lambda m, a, o: captured.append(("base", o)), prepend=True))
            handles.append(module.register_forward_hook(lambda m, a, o: captured.append(("adapted", o))))
    model(input_ids=ids, attention_mask=am, prompt_mask=pm)
    for h in handles:
        h.remove()

    pairs = [(captured[i][1], captured[i + 1][1]) for i in range(0, len(captured), 2)]
    assert all(captured[i][0] == "base" and captured[i + 1][0] == "adapted" for i in range(0, len(captured), 2))
    for base_out, adapted_out in pairs:
        assert torch.equal(base_out[completion], adapted_out[completion])
        checked += 1
        differ_at_prompt += int(not torch.equal(base_out[pm], adapted_out[pm]))
    expected = 2 * 7 if method == "lora" else 2
    assert checked == expected
    assert differ_at_prompt >= 1  # the adapter is live where it should be


# ------------------------------------------------------------------------------------------- 2
@params_all
def test_fresh_adapter_is_bit_identical_to_base(load_tiny, tokenizer, method, dtype, padding):
    model = make_preft(load_tiny, method, dtype)
    ids, am, pm = batch(tokenizer, padding)
    adapted = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    with model.disable_adapter():
        base = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    plain = load_tiny(dtype)(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(adapted, base)
    assert torch.equal(adapted, plain)
    assert model.is_identity()


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_is_identity_says_whether_the_adapter_changes_anything(load_tiny, tokenizer, method):
    """Each adapter tensor changed alone: is_identity() is True exactly when the logits still equal the base's (a
    changed LoRA A with B = 0 leaves the model unchanged; a changed B, a ReFT bias or projection does not)."""
    model = make_preft(load_tiny, method, torch.float32)
    ids, am, pm = batch(tokenizer, "left")
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
        seen = set()
        for name, param in model.adapter_named_parameters():
            saved = param.detach().clone()
            param.add_(0.5 + torch.rand_like(param))
            changed = not torch.equal(model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, base)
            assert model.is_identity() == (not changed), name
            seen.add(changed)
            param.copy_(saved)
        assert model.is_identity()
    assert True in seen


# ------------------------------------------------------------------------------------------- 3
def _generate_with_logits(model, tokenizer, max_new_tokens=6):
    ids, am, _ = batch(tokenizer, "left", with_completion=False)
    out = model.generate(
        input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    return ids, am, out.sequences, torch.stack(out.logits, dim=1)  # (B, G, V)


@params_all
def test_full_forward_matches_incremental_generation(load_tiny, tokenizer, method, dtype, padding):
    model = make_preft(load_tiny, method, dtype)
    randomize_adapter(model)
    prompt_ids, prompt_am, sequences, gen_logits = _generate_with_logits(model, tokenizer)
    prompt_width, gen_len = prompt_ids.shape[1], gen_logits.shape[1]
    assert torch.equal(sequences[:, :prompt_width], prompt_ids)  # HF return value: prompt included

    # Rebuild the same sequences with the requested padding; the prompt mask marks the prompt tokens.
    lengths = prompt_am.sum(-1)
    rows = [torch.cat([prompt_ids[b, prompt_width - lengths[b]:], sequences[b, prompt_width:]]) for b in range(len(lengths))]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    am = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        cols = slice(width - len(r), width) if padding == "left" else slice(0, len(r))
        ids[b, cols], am[b, cols] = r, 1
    pm = prompt_mask_from_lengths(am, lengths)
    full = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits

    for b, r in enumerate(rows):
        start = (width - len(r) if padding == "left" else 0) + int(lengths[b]) - 1  # last prompt token predicts token 1
        full_b = full[b, start : start + gen_len].float()  # (G, V)
        diff = (full_b - gen_logits[b].float()).abs().max().item()
        assert diff <= LOGIT_ATOL[dtype], f"row {b}: max logit diff {diff}"
        if dtype == torch.float32:
            # greedy tokens from generate equal argmax decoding of the full forward
            assert torch.equal(full_b.argmax(-1), sequences[b, prompt_width:])

    # the adapter really mattered for what was generated (otherwise this test could not fail)
    with model.disable_adapter():
        _, _, _, base_logits = _generate_with_logits(model, tokenizer)
    assert (base_logits[:, 0].float() - gen_logits[:, 0].float()).abs().max() > 10 * LOGIT_ATOL[dtype]


def loreft_edit(intervention, h):
    """LoReFT's edit R^T (W h + b - R h), written out from the paper (independent of the library's maths)."""
    R, W, b = intervention.rotate_layer.weight, intervention.learned_source.weight, intervention.learned_source.bias
    return (h @ W.T + b - h @ R.T) @ R


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_decode_steps_do_no_adapter_work(load_tiny, tokenizer, method, monkeypatch):
    """Invariant 5 on the reference path: after the prompt pass, no adapter module computes anything."""
    import preft_rl.adapters.layers as layers

    model = make_preft(load_tiny, method, torch.float32)
    randomize_adapter(model)
    rows_seen = []
    # every adapter module computes through the kernels' torch references (the one copy of the maths): spy on them
    def spy(real, rows_arg):
        def counted(*args, **kwargs):
            rows_seen.append(int(args[rows_arg].numel()))
            return real(*args, **kwargs)
        return counted

    monkeypatch.setattr(layers, "lora_prefill_reference", spy(layers.lora_prefill_reference, 5))
    monkeypatch.setattr(layers, "reft_prefill_reference", spy(layers.reft_prefill_reference, 4))
    ids, am, pm = batch(tokenizer, "left", with_completion=False)
    model.generate(input_ids=ids, attention_mask=am, max_new_tokens=5, do_sample=False)
    if method == "loreft":  # f2+l2: the first 2 and last 2 prompt tokens of each row
        expected_rows = int(torch.stack(reft_position_mask(pm, 2, 2)).any(0).sum())
    else:
        expected_rows = int(pm.sum())
    n_modules = 2 * 7 if method == "lora" else 2
    assert rows_seen == [expected_rows] * n_modules  # one call per module, prompt tokens only, none in decode


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_padding_does_not_change_a_row(load_tiny, tokenizer, method):
    """A row's logits in a padded batch equal the same row alone (positions count from the first real token)."""
    model = make_preft(load_tiny, method, torch.float32)
    randomize_adapter(model)
    for padding in ("left", "right"):
        ids, am, pm = batch(tokenizer, padding)
        full = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
        for b in range(ids.shape[0]):
            keep = am[b].bool()
            alone = model(input_ids=ids[b : b + 1, keep], prompt_mask=pm[b : b + 1, keep]).logits[0]
            torch.testing.assert_close(full[b, keep], alone, atol=1e-4, rtol=1e-4)


def test_reft_separate_first_last_interventions(load_tiny, tokenizer):
    """Layer 0's output, by hand: 'first' at the first prompt token, 'last' at the last two, first-then-last where
    a token is in both ranges, nothing elsewhere (a test that fails if either intervention is ignored or swapped)."""
    from preft_rl.adapters.masks import reft_position_mask

    model = make_preft(load_tiny, "loreft", torch.float32, share_first_last=False, positions="f1+l2", layers=[0])
    names = {n for n, _ in model.adapter_named_parameters()}
    assert any(".interventions.first." in n for n in names) and any(".interventions.last." in n for n in names)
    randomize_adapter(model)
    ids, am, pm = batch(tokenizer, "left")
    pm[0] = False
    pm[0, am[0].bool().nonzero()[0, 0]] = True  # row 0: a one-token prompt, in both the first and the last range
    layer0 = model.base_model.model.layers[0]
    captured = []
    hook = layer0.register_forward_hook(lambda mod, args, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with model.disable_adapter():
            model(input_ids=ids, attention_mask=am, prompt_mask=pm)
        model(input_ids=ids, attention_mask=am, prompt_mask=pm)
    finally:
        hook.remove()
    plain, adapted = captured
    first, last = reft_position_mask(pm, 1, 2)
    interventions = layer0.preft_reft.interventions
    expected = plain.clone()
    with torch.no_grad():
        expected[first] = expected[first] + loreft_edit(interventions["first"], expected[first])
        expected[last] = expected[last] + loreft_edit(interventions["last"], expected[last])
    assert bool((first & last).any()) and bool((last & ~first).any())
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(adapted[~(first | last)], plain[~(first | last)])  # every other token untouched in layer 0


# ------------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_reach_only_the_adapter(load_tiny, tokenizer, method, dtype):
    model = make_preft(load_tiny, method, dtype)
    model.train()
    ids, am, pm = batch(tokenizer, "right")
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    adapter = dict(model.adapter_named_parameters())
    assert adapter and all(p.requires_grad for p in adapter.values())
    assert all(not p.requires_grad for n, p in model.base_model.named_parameters() if n not in adapter)

    optimizer = torch.optim.AdamW([p for p in adapter.values()], lr=1e-2)
    for step in range(2):
        logits = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
        completion = (am.bool() & ~pm)[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][completion].float(), ids[:, 1:][completion])
        optimizer.zero_grad()
        loss.backward()
        live = {n for n, p in adapter.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        if step == 0:
            # the no-op start still learns: the zero half (LoRA B, DiReFT W2) and all of LoReFT get gradients
            must_learn = {n for n in adapter if n.endswith(("lora_B.weight", "proj_layer.weight")) or method == "loreft"}
        else:
            must_learn = set(adapter)  # once that half moved, every adapter tensor gets a gradient
        assert must_learn <= live, sorted(must_learn - live)[:3]
        optimizer.step()
    for name, param in model.base_model.named_parameters():
        if name in base_before:
            assert param.grad is None
            assert torch.equal(param, base_before[name]), name


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_changing_the_adapter_changes_completion_logits(load_tiny, tokenizer, method):
    """The prompt KV path is live: completion tokens see the adapter only through the prompt's keys/values."""
    model = make_preft(load_tiny, method, torch.float32)
    randomize_adapter(model, seed=1)
    ids, am, pm = batch(tokenizer, "left")
    completion = am.bool() & ~pm
    first = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits[completion]
    randomize_adapter(model, seed=2)
    second = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits[completion]
    assert (first - second).abs().max() > 1e-3


def test_forward_without_prompt_mask_is_an_error(load_tiny, tokenizer):
    model = make_preft(load_tiny, "lora", torch.float32)
    ids, am, _ = batch(tokenizer, "left")
    with pytest.raises(ValueError, match="needs prompt_mask"):
        model(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match="prompt_mask has shape"):
        model(input_ids=ids, attention_mask=am, prompt_mask=torch.ones(1, 2, dtype=torch.bool))


def test_generate_refuses_right_padding(load_tiny, tokenizer):
    model = make_preft(load_tiny, "lora", torch.float32)
    ids, am, _ = batch(tokenizer, "right", with_completion=False)
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        model.generate(input_ids=ids, attention_mask=am, max_new_tokens=2)


def test_disable_adapter_is_the_base_policy_and_restores(load_tiny, tokenizer):
    model = make_preft(load_tiny, "direft", torch.float32)
    randomize_adapter(model)
    ids, am, pm = batch(tokenizer, "left")
    plain = load_tiny()(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    adapted = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, plain)
    assert torch.equal(model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, adapted)
    assert not torch.equal(adapted, plain)


def test_gradient_checkpointing_recomputes_with_the_same_selection(load_tiny, tokenizer):
    """Recomputation during backward must apply the adapter at the same tokens as the forward did."""
    ids, am, pm = batch(tokenizer, "right")
    grads = []
    for checkpointing in (False, True):
        model = make_preft(load_tiny, "lora", torch.float32)
        randomize_adapter(model)
        model.train()
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits.pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in model.adapter_named_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
