"""Triton kernels vs the pure-torch references (DESIGN.md invariants 5 and 6).

These tests run the Triton code itself: natively on CUDA when a GPU is present, otherwise on CPU under the
Triton interpreter. The interpreter must be switched on before triton is first imported, which a shared
pytest process cannot guarantee, so on CPU `tests/test_kernels.py::test_triton_kernels_under_interpreter`
runs this file in a child process with TRITON_INTERPRET=1; in the parent process they are skipped.
Run them directly with:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_kernels_triton.py

Shapes come from a pairwise-covering set (every pair of factor values appears in some case) instead of
the full cross-product, which is far too slow interpreted. Every case draws fresh random inputs, assigns
tokens to adapters in random order with about a quarter of them at -1, gives adapters random ranks
zero-padded to the stacked rank, and fills the kernels' scratch buffers with NaN so a read of anything a
kernel did not write shows up.
"""

from __future__ import annotations

import itertools
import os
import zlib

import pytest
import torch

from preft_rl.kernels import (
    AdapterTokenMetadata,
    apply_direft,
    apply_lora,
    apply_loreft,
    direft_forward_reference,
    lora_forward_reference,
    loreft_forward_reference,
    prefill_direft,
    prefill_lora,
    prefill_loreft,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(
    DEVICE is None,
    reason="no GPU and TRITON_INTERPRET is not 1: run by tests/test_kernels.py::test_triton_kernels_under_interpreter",
)

# dtype -> (atol, rtol), applied to values of order 1. bf16 allows ~2 ulps: one for the reference's
# rounding, one for the interpreter (whose bf16 stores truncate) or for the bf16 low-rank operand that the
# tensor-core path feeds to tl.dot.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}


def pairwise(factors: dict[str, list]) -> list[dict]:
    """A small greedy all-pairs covering set: every pair of values of two factors appears in some row."""
    names = list(factors)
    sizes = [len(factors[n]) for n in names]

    def pairs(row: dict[int, int]) -> set:
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(sorted(row), 2)}

    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(names)), 2) for a in range(sizes[i]) for b in range(sizes[j])}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for k in range(len(names)):
            if k not in row:  # the value covering the most still-uncovered pairs with the values chosen so far
                row[k] = max(range(sizes[k]), key=lambda v: (len(pairs({**row, k: v}) & uncovered), -v))
        rows.append(row)
        uncovered -= pairs(row)
    return [{names[k]: factors[names[k]][v] for k, v in sorted(row.items())} for row in rows]


DTYPES = [torch.float32, torch.bfloat16]
LORA_FACTORS = {"T": [1, 7, 64, 130], "N": [1, 3, 17], "r": [1, 8, 16, 64], "d": [64, 96, 160], "dtype": DTYPES, "slices": [1, 2, 3]}
REFT_FACTORS = {"T": [1, 7, 64, 130], "N": [1, 3, 17], "r": [1, 8, 16, 64], "d": [64, 96, 160], "dtype": DTYPES, "method": ["loreft", "direft"]}
GRAD_FACTORS = {"T": [1, 7, 64, 130], "r": [1, 8, 16, 64], "d": [64, 96, 160], "dtype": DTYPES, "method": ["lora", "loreft", "direft"]}
LORA_CASES, REFT_CASES, GRAD_CASES = pairwise(LORA_FACTORS), pairwise(REFT_FACTORS), pairwise(GRAD_FACTORS)


def case_id(case: dict) -> str:
    return "-".join(f"{k}{str(v).replace('torch.', '')}" for k, v in case.items())


def generator_for(case: dict) -> torch.Generator:
    """Fresh, reproducible random inputs per case."""
    return torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))


def random_index(num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter slot per token in random order, about a quarter -1, at least one token with an adapter."""
    index = torch.randint(0, num_slots, (num_tokens,), generator=gen, dtype=torch.int32)
    index[torch.rand(num_tokens, generator=gen) < 0.25] = -1
    if bool((index < 0).all()):
        index[torch.randint(0, num_tokens, (1,), generator=gen)] = num_slots - 1
    return index


def padded_ranks(num_slots: int, rank: int, gen: torch.Generator) -> list[int]:
    """Per-adapter ranks in [1, rank], the largest equal to rank."""
    ranks = torch.randint(1, rank + 1, (num_slots,), generator=gen).tolist()
    ranks[0] = rank
    return ranks


def on_device(t: torch.Tensor) -> torch.Tensor:
    """A copy on the test device (a copy even when that is the CPU, so in-place ops never alias the inputs)."""
    return t.detach().clone().to(DEVICE)


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    scale = max(1.0, ref.abs().max().item())  # weight gradients sum over tokens and grow with T
    torch.testing.assert_close(got.float().cpu(), ref.float().cpu(), atol=atol * scale, rtol=rtol)


def test_pairwise_sets_cover_every_pair():
    for factors, cases in ((LORA_FACTORS, LORA_CASES), (REFT_FACTORS, REFT_CASES), (GRAD_FACTORS, GRAD_CASES)):
        for a, b in itertools.combinations(factors, 2):
            seen = {(c[a], c[b]) for c in cases}
            assert seen == set(itertools.product(factors[a], factors[b])), (a, b)
        full = 1
        for values in factors.values():
            full *= len(values)
        assert len(cases) <= full // 10  # far smaller than the cross-product


@pytest.fixture(autouse=True)
def poisoned_workspaces(monkeypatch):
    if DEVICE is not None:
        from preft_rl.kernels import triton_common

        monkeypatch.setattr(triton_common, "POISON_WORKSPACES", True)


def launches() -> int:
    from preft_rl.kernels import triton_common

    return sum(triton_common.LAUNCHES.values())


def make_lora(case: dict, gen: torch.Generator):
    """Stacked zero-padded LoRA weights for `slices` output slices (widths d, d/2, d/2 like a GQA qkv)."""
    n, r, d, dtype = case["N"], case["r"], case["d"], case["dtype"]
    widths = (d, d // 2, d // 2)[: case["slices"]] if case["slices"] != 2 else (d, d)
    lora_a = torch.zeros(n, len(widths) * r, d)
    lora_b = torch.zeros(n, sum(widths), r)
    for slot, rank in enumerate(padded_ranks(n, r, gen)):
        for s in range(len(widths)):
            lora_a[slot, s * r : s * r + rank] = torch.randn(rank, d, generator=gen) / d**0.5
        lora_b[slot, :, :rank] = torch.randn(sum(widths), rank, generator=gen) / rank**0.5
    scaling = torch.rand(n, generator=gen) + 0.5
    return lora_a.to(dtype), lora_b.to(dtype), scaling, widths


@needs_triton
@pytest.mark.parametrize("case", LORA_CASES, ids=case_id)
def test_lora_triton_matches_reference(case):
    gen = generator_for(case)
    lora_a, lora_b, scaling, widths = make_lora(case, gen)
    x = torch.randn(case["T"], case["d"], generator=gen).to(case["dtype"])
    base = torch.randn(case["T"], sum(widths), generator=gen).to(case["dtype"])
    index = random_index(case["T"], case["N"], gen)
    ref = lora_forward_reference(base.clone(), x, lora_a, lora_b, scaling, AdapterTokenMetadata.build(index), widths)

    x, out, lora_a, lora_b, scaling, index = (on_device(t) for t in (x, base, lora_a, lora_b, scaling, index))
    metadata = AdapterTokenMetadata.build(index)
    before = launches()
    got = apply_lora(out, x, lora_a, lora_b, scaling, metadata, output_slices=widths, backend="triton")
    assert got is out and launches() - before == 2  # shrink + expand, in place
    off = (index < 0).cpu()
    assert torch.equal(got.cpu()[off], base[off])  # no-adapter rows: bit-identical
    assert_close(got[~off.to(DEVICE)], ref[~off], case["dtype"])


@needs_triton
@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_lora_split_k_sums_partials(split_k):
    """Split-K shrink (chosen on GPUs when tiles are few) gives the same result; with split 8 and only 3
    d_in blocks some programs own no block and must still write their (zero) partial sums."""
    from preft_rl.kernels import triton_lora

    case = {"T": 40, "N": 3, "r": 8, "d": 96, "dtype": torch.float32, "slices": 3}
    gen = generator_for({**case, "split": split_k})
    lora_a, lora_b, scaling, widths = make_lora(case, gen)
    lora_a, lora_b, scaling = on_device(lora_a), on_device(lora_b), on_device(scaling)
    x = on_device(torch.randn(40, 96, generator=gen))
    base = on_device(torch.randn(40, sum(widths), generator=gen))
    metadata = AdapterTokenMetadata.build(on_device(random_index(40, 3, gen)))
    ref = lora_forward_reference(base.clone(), x, lora_a, lora_b, scaling, metadata, widths)
    config = triton_lora.LoraLaunchConfig(block_m=16, shrink_block_k=32, shrink_block_r=16, split_k=split_k, expand_block_n=32)
    got = base.clone()
    triton_lora.lora_forward(got, x, lora_a, lora_b, scaling, metadata, widths, config)
    assert_close(got, ref, torch.float32)


@needs_triton
@pytest.mark.parametrize("num_tokens,num_slots,block_m,split_k", [(8192, 8, 64, 2), (512, 1, 64, 8), (8192, 64, 16, 1), (8192, 512, 16, 1)])
def test_launch_config_splits_k_only_when_tiles_are_few(monkeypatch, num_tokens, num_slots, block_m, split_k):
    """On a 132-SM GPU at d_in = 4096: 16-token tiles up to 128 tokens per adapter, else 64 (triton_lora's table),
    and split d_in only while the tiles do not fill one wave."""
    from preft_rl.kernels import triton_common, triton_lora

    monkeypatch.setattr(triton_common, "sm_count", lambda device: 132)
    index = torch.arange(num_tokens, dtype=torch.int32) % num_slots  # even groups
    config = triton_lora.choose_config(AdapterTokenMetadata.build(index), 4096, 16, 16, False, torch.device("cpu"))
    assert (config.block_m, config.split_k) == (block_m, split_k)


@needs_triton
def test_lora_strided_inputs_and_mixed_dtypes():
    """x a column slice of a wider buffer (row stride != d_in), bf16 activations with fp32 adapter weights."""
    case = {"T": 33, "N": 3, "r": 16, "d": 96, "dtype": torch.float32, "slices": 1}
    gen = generator_for(case)
    lora_a, lora_b, scaling, widths = make_lora(case, gen)
    wide = torch.randn(33, 160, generator=gen).to(torch.bfloat16)
    x = wide[:, 32:128]
    base = torch.randn(33, 96, generator=gen).to(torch.bfloat16)
    index = random_index(33, 3, gen)
    ref = lora_forward_reference(base.clone(), x, lora_a, lora_b, scaling, AdapterTokenMetadata.build(index))
    to = on_device
    got = apply_lora(to(base), to(wide)[:, 32:128], to(lora_a), to(lora_b), to(scaling), AdapterTokenMetadata.build(to(index)), backend="triton")
    off = index < 0
    assert torch.equal(got.cpu()[off], base[off])
    assert_close(got.cpu()[~off], ref[~off], torch.bfloat16)


def make_reft(case: dict, gen: torch.Generator):
    """Stacked zero-padded ReFT weights: (R, W, b) for LoReFT, (W1, b, W2) for DiReFT."""
    n, r, d = case["N"], case["r"], case["d"]
    first, second, bias = torch.zeros(n, r, d), torch.zeros(n, r, d), torch.zeros(n, r)
    for slot, rank in enumerate(padded_ranks(n, r, gen)):
        if case["method"] == "loreft":
            first[slot, :rank] = torch.linalg.qr(torch.randn(d, rank, generator=gen)).Q.T  # R, orthonormal rows
            second[slot, :rank] = first[slot, :rank] + 0.3 * torch.randn(rank, d, generator=gen) / d**0.5  # W
        else:
            first[slot, :rank] = torch.randn(rank, d, generator=gen) / d**0.5  # W1
            second[slot, :rank] = torch.randn(rank, d, generator=gen) / rank**0.5  # W2
        bias[slot, :rank] = 0.5 * torch.randn(rank, generator=gen)
    dtype = case["dtype"]
    if case["method"] == "loreft":
        return first.to(dtype), second.to(dtype), bias.to(dtype)  # rotation, weight, bias
    return first.to(dtype), bias.to(dtype), second.to(dtype)  # weight, bias, proj


@needs_triton
@pytest.mark.parametrize("case", REFT_CASES, ids=case_id)
def test_reft_triton_matches_reference(case):
    gen = generator_for(case)
    weights = make_reft(case, gen)
    h = torch.randn(case["T"], case["d"], generator=gen).to(case["dtype"])
    index = random_index(case["T"], case["N"], gen)
    reference, op = (
        (loreft_forward_reference, apply_loreft) if case["method"] == "loreft" else (direft_forward_reference, apply_direft)
    )
    ref = reference(h.clone(), *weights, AdapterTokenMetadata.build(index))

    got_h = on_device(h)
    metadata = AdapterTokenMetadata.build(on_device(index))
    before = launches()
    got = op(got_h, *(on_device(w) for w in weights), metadata, backend="triton")
    assert got is got_h and launches() - before == 1  # one fused kernel, in place
    off = index < 0
    assert torch.equal(got.cpu()[off], h[off])
    assert_close(got.cpu()[~off], ref[~off], case["dtype"])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_largest_supported_rank_and_the_error_beyond_it(dtype):
    """Rank 128 (the kernels' maximum: wide-rank tiles for ReFT, 8-warp expand) matches the references;
    rank 129 is refused with a message that names the fix."""
    lora_case = {"T": 50, "N": 2, "r": 128, "d": 160, "dtype": dtype, "slices": 1}
    gen = generator_for(lora_case)
    lora_a, lora_b, scaling, widths = make_lora(lora_case, gen)
    x, base = torch.randn(50, 160, generator=gen).to(dtype), torch.randn(50, 160, generator=gen).to(dtype)
    index = random_index(50, 2, gen)
    ref = lora_forward_reference(base.clone(), x, lora_a, lora_b, scaling, AdapterTokenMetadata.build(index))
    meta = AdapterTokenMetadata.build(on_device(index))
    got = apply_lora(on_device(base), on_device(x), on_device(lora_a), on_device(lora_b), on_device(scaling), meta, backend="triton")
    assert_close(got, ref, dtype)
    for method in ("loreft", "direft"):
        weights = make_reft({**lora_case, "method": method}, gen)
        ref = (loreft_forward_reference if method == "loreft" else direft_forward_reference)(x.clone(), *weights, AdapterTokenMetadata.build(index))
        got = (apply_loreft if method == "loreft" else apply_direft)(on_device(x), *map(on_device, weights), meta, backend="triton")
        assert_close(got, ref, dtype)
    too_wide = torch.zeros(2, 160, 129, device=DEVICE)
    before = launches()
    with pytest.raises(ValueError, match="rank 129 exceeds the kernels' maximum 128; use backend='torch'"):
        apply_lora(on_device(base), on_device(x), torch.zeros(2, 129, 160, device=DEVICE), too_wide, 1.0, meta, backend="triton")
    assert launches() == before


@needs_triton
def test_autograd_accepts_row_indices_like_a_mask():
    gen = torch.Generator().manual_seed(3)
    base, x = torch.randn(12, 40, generator=gen), torch.randn(12, 64, generator=gen)
    a, b = torch.randn(8, 64, generator=gen), torch.randn(40, 8, generator=gen)
    mask = torch.rand(12, generator=gen) < 0.5
    mask[0] = True
    rows = mask.nonzero().squeeze(1).flip(0)  # any order
    by_mask = prefill_lora(on_device(base), on_device(x), on_device(a), on_device(b), 2.0, on_device(mask), backend="triton")
    by_rows = prefill_lora(on_device(base), on_device(x), on_device(a), on_device(b), 2.0, on_device(rows), backend="triton")
    assert torch.equal(by_mask, by_rows)


@needs_triton
def test_loreft_at_initialisation_is_an_exact_no_op():
    """W = R, b = 0: (W - R) is formed in fp32 inside the kernel, so the edit is exactly zero."""
    gen = torch.Generator().manual_seed(5)
    rotation = on_device(torch.linalg.qr(torch.randn(2, 96, 8, generator=gen)).Q.transpose(1, 2))
    h = on_device(torch.randn(19, 96, generator=gen).to(torch.bfloat16))
    index = on_device(random_index(19, 2, gen))
    got = apply_loreft(h.clone(), rotation, rotation.clone(), torch.zeros(2, 8, device=DEVICE), AdapterTokenMetadata.build(index), backend="triton")
    assert torch.equal(got, h)


@needs_triton
def test_pure_decode_step_launches_nothing():
    """Invariant 5: every token at -1 -> no kernel launch, inputs untouched (and the same objects returned)."""
    gen = torch.Generator().manual_seed(0)
    metadata = AdapterTokenMetadata.build(torch.full((9,), -1, dtype=torch.int32, device=DEVICE))
    assert metadata.is_empty
    x, h = torch.randn(9, 64, generator=gen).to(DEVICE), torch.randn(9, 64, generator=gen).to(DEVICE)
    out = torch.randn(9, 32, generator=gen).to(DEVICE)
    out_copy, h_copy = out.clone(), h.clone()
    w = torch.randn(2, 4, 64, device=DEVICE)
    before = launches()
    assert apply_lora(out, x, w, torch.randn(2, 32, 4, device=DEVICE), 2.0, metadata, backend="triton") is out
    assert apply_loreft(h, w, w, torch.zeros(2, 4, device=DEVICE), metadata, backend="triton") is h
    assert apply_direft(h, w, torch.zeros(2, 4, device=DEVICE), w, metadata, backend="triton") is h
    none = torch.zeros(9, dtype=torch.bool, device=DEVICE)
    assert prefill_lora(out, x, w[0], torch.randn(32, 4, device=DEVICE), 2.0, none, backend="triton") is out
    assert prefill_loreft(h, w[0], w[1], torch.zeros(4, device=DEVICE), none, backend="triton") is h
    assert launches() == before
    assert torch.equal(out, out_copy) and torch.equal(h, h_copy)


@needs_triton
@pytest.mark.parametrize("split", [2, 3])
def test_weight_gradient_reduction_with_token_split(split):
    from preft_rl.kernels.triton_grad import gathered_outer

    gen = torch.Generator().manual_seed(split)
    u = torch.randn(70, 8, generator=gen)
    x = torch.randn(90, 96, generator=gen)
    rows = torch.randperm(90, generator=gen)[:70].sort().values.to(torch.int32)
    got = gathered_outer(on_device(u), on_device(x), on_device(rows), 0.5, split=split)
    assert_close(got, 0.5 * u.T @ x[rows.long()], torch.float32)


def _grad_inputs(case: dict, gen: torch.Generator, batch_shape: tuple[int, ...]):
    """Inputs (leaf tensors) and the op for one autograd case; shared weights in fp32 as the trainer keeps them."""
    r, d, dtype = case["r"], case["d"], case["dtype"]
    if case["method"] == "lora":
        d_out = d + 32
        base = torch.randn(*batch_shape, d_out, generator=gen).to(dtype)
        x = torch.randn(*batch_shape, d, generator=gen).to(dtype)
        a = torch.randn(r, d, generator=gen) / d**0.5
        b = torch.randn(d_out, r, generator=gen) / r**0.5
        return (base, x, a, b), lambda t, rows, be: prefill_lora(*t, 2.0, rows, backend=be)
    h = torch.randn(*batch_shape, d, generator=gen).to(dtype)
    bias = 0.5 * torch.randn(r, generator=gen)
    if case["method"] == "loreft":
        rotation = torch.linalg.qr(torch.randn(d, r, generator=gen)).Q.T.contiguous()
        weight = rotation + 0.3 * torch.randn(r, d, generator=gen) / d**0.5
        return (h, rotation, weight, bias), lambda t, rows, be: prefill_loreft(*t, rows, backend=be)
    w1, w2 = torch.randn(r, d, generator=gen) / d**0.5, torch.randn(r, d, generator=gen) / r**0.5
    return (h, w1, bias, w2), lambda t, rows, be: prefill_direft(*t, rows, backend=be)


@needs_triton
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_autograd_triton_matches_torch_gradients(case):
    """Forward values and the gradients of the input and every weight, Triton vs torch autograd of the
    reference; inputs (B, T/B, d) with a bool prompt mask, as the trainer passes them."""
    gen = generator_for(case)
    batch_shape = (2, (case["T"] + 1) // 2) if case["T"] > 1 else (1, 1)
    tensors, op = _grad_inputs(case, gen, batch_shape)
    prompt = torch.rand(batch_shape, generator=gen) < 0.7
    prompt.view(-1)[0] = True
    grad_out = torch.randn(*tensors[0].shape, generator=gen).to(case["dtype"])
    results = {}
    for backend, device in (("torch", "cpu"), ("triton", DEVICE)):
        leaves = [t.detach().clone().to(device).requires_grad_() for t in tensors]
        out = op(leaves, prompt.to(device), backend)
        out.backward(grad_out.to(device))
        results[backend] = [out.detach().cpu().clone()] + [t.grad.cpu().clone() for t in leaves]
    off = ~prompt
    assert torch.equal(results["triton"][0][off], tensors[0][off])  # non-prompt rows: the input, bit for bit
    for got, ref in zip(results["triton"], results["torch"]):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert_close(got, ref, case["dtype"])


@needs_triton
@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("lora", True), ("loreft", False), ("direft", True)])
def test_preft_model_training_pass_on_the_kernels_matches_torch(load_tiny, monkeypatch, method, checkpointing):
    """PreftModel's LoRA and ReFT layers run the Triton prefill kernels forward and backward (on CUDA by default;
    here forced, so the interpreter runs them on CPU): same logits and adapter gradients as the torch path."""
    from preft_rl import PreftConfig, get_preft_model
    from test_adapters import randomize_adapter

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (3, 10), generator=gen).to(DEVICE)
    am = torch.ones_like(ids)
    am[2, -4:] = 0  # right padding
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[0, :6], pm[1, :3], pm[2, :5] = True, True, True
    positions = "all" if method == "lora" else "f2+l2"
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PREFT_KERNEL_BACKEND", backend)
        base = load_tiny()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.train()
        model = get_preft_model(base, PreftConfig(method=method, r=4, positions=positions, seed=0))
        randomize_adapter(model, seed=1)  # on the CPU, then moved: the same adapter on any device
        model.to(DEVICE)
        before = launches()
        logits = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
        (logits.float().square() * am[..., None]).mean().backward()
        grads = {name: p.grad.detach().cpu() for name, p in model.adapter_named_parameters()}
        results[backend] = (logits.detach().cpu(), grads, launches() - before)
    (ref_logits, ref_grads, torch_launches), (logits, grads, triton_launches) = results["torch"], results["triton"]
    assert torch_launches == 0 and triton_launches > 0
    assert_close(logits, ref_logits, torch.float32)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name
        assert_close(grads[name], ref_grads[name], torch.float32)
