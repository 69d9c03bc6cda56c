"""preft_rl.kernels on the torch path: metadata, backend dispatch, and the references against naive per-token
math and against the Hugging Face reference modules. The Triton kernels themselves are tested in
tests/test_kernels_triton.py, which `test_triton_kernels_under_interpreter` runs on CPU in a child process
with TRITON_INTERPRET=1 (the interpreter must be on before triton is imported, and this process may
already have imported triton without it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preft_rl.kernels import (
    AdapterTokenMetadata,
    apply_direft,
    apply_lora,
    apply_loreft,
    lora_forward_reference,
    prefill_direft,
    prefill_lora,
    prefill_loreft,
    resolve_backend,
)

REPO = Path(__file__).resolve().parents[1]
TRITON_TESTS = REPO / "tests" / "test_kernels_triton.py"

# ---------------------------------------------------------------- metadata


def test_metadata_groups_tokens_by_adapter():
    meta = AdapterTokenMetadata.build(torch.tensor([2, -1, 0, 2, 0, -1], dtype=torch.int32))
    assert meta.sorted_token_indices.tolist() == [2, 4, 0, 3]
    assert meta.active_adapter_ids.tolist() == [0, 2]
    assert meta.adapter_token_counts.tolist() == [2, 2]
    assert meta.adapter_token_offsets.tolist() == [0, 2, 4]
    assert (meta.num_tokens, meta.num_active_tokens, meta.max_adapter_id, meta.is_empty) == (6, 4, 2, False)
    assert meta.sorted_token_indices.dtype == torch.int32


@pytest.mark.parametrize("num_tokens,num_slots,block_m", [(1, 1, 16), (50, 3, 16), (300, 17, 32), (1000, 512, 64)])
def test_metadata_and_tiles_partition_the_active_tokens(num_tokens, num_slots, block_m):
    gen = torch.Generator().manual_seed(num_tokens)
    index = torch.randint(-1, num_slots, (num_tokens,), generator=gen, dtype=torch.int32)
    meta = AdapterTokenMetadata.build(index)
    rows = meta.sorted_token_indices.long()
    assert sorted(rows.tolist()) == (index >= 0).nonzero().squeeze(1).tolist()  # each active token exactly once
    for group, adapter in enumerate(meta.active_adapter_ids.tolist()):
        start, end = meta.adapter_token_offsets[group].item(), meta.adapter_token_offsets[group + 1].item()
        group_rows = rows[start:end]
        assert (index[group_rows] == adapter).all() and (group_rows.diff() > 0).all()  # one adapter, ascending rows
    tiles = meta.tiles(block_m)
    assert tiles is meta.tiles(block_m)  # cached for the step
    covered = []
    for adapter, start, end in tiles.T.tolist():
        span = range(start, min(start + block_m, end))
        assert len(span) > 0 and (index[rows[list(span)]] == adapter).all()  # no empty tile, one adapter per tile
        covered.extend(span)
    assert covered == list(range(meta.num_active_tokens))


def test_runs_are_maximal_blocks_of_one_adapter_in_row_order():
    meta = AdapterTokenMetadata.build(torch.tensor([2, 2, -1, 0, 0, 2, -1, -1], dtype=torch.int32))
    assert meta.runs() == ((0, 2, 2), (3, 5, 0), (5, 6, 2))
    assert sum(end - start for start, end, _ in meta.runs()) == meta.num_active_tokens
    assert AdapterTokenMetadata.build(torch.full((3,), -1, dtype=torch.int32)).runs() == ()
    assert AdapterTokenMetadata.build(torch.zeros(0, dtype=torch.int32)).runs() == ()


def test_all_minus_one_metadata_is_empty_and_gathers_nothing():
    meta = AdapterTokenMetadata.build(torch.full((7,), -1, dtype=torch.int32))
    assert meta.is_empty and meta.num_active_tokens == 0 and meta.sorted_token_indices.numel() == 0
    x, out = torch.randn(7, 8), torch.randn(7, 4)
    snapshot = out.clone()
    # Weights of the wrong shape: an empty step must return before it even looks at them.
    assert apply_lora(out, x, torch.empty(0), torch.empty(0), 1.0, meta, backend="torch") is out
    assert torch.equal(out, snapshot)
    assert AdapterTokenMetadata.build(torch.empty(0, dtype=torch.int32)).is_empty


def test_metadata_rejects_bad_indices_and_mismatched_weights():
    with pytest.raises(ValueError, match="use -1"):
        AdapterTokenMetadata.build(torch.tensor([0, -2], dtype=torch.int32))
    meta = AdapterTokenMetadata.build(torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="slot 3 but the stacked weights hold 2 slots"):
        apply_lora(torch.zeros(2, 4), torch.zeros(2, 8), torch.zeros(2, 2, 8), torch.zeros(2, 4, 2), 1.0, meta)
    with pytest.raises(ValueError, match=r"lora_a has shape .* must be \(4, 6, 8\)"):
        apply_lora(torch.zeros(2, 12), torch.zeros(2, 8), torch.zeros(4, 2, 8), torch.zeros(4, 12, 2), 1.0, meta, output_slices=(4, 4, 4))


def test_for_rows_accepts_a_mask_or_indices():
    mask = torch.tensor([False, True, True, False, True])
    a = AdapterTokenMetadata.for_rows(mask, 5)
    b = AdapterTokenMetadata.for_rows(torch.tensor([4, 1, 2]), 5)
    for meta in (a, b):
        assert meta.sorted_token_indices.tolist() == [1, 2, 4] and meta.active_ids_host == (0,)


# ---------------------------------------------------------------- dispatch


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("PREFT_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.zeros(1)
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("PREFT_KERNEL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend(None, cpu)  # the environment variable forces Triton
    assert resolve_backend("torch", cpu) == "torch"  # the argument beats the environment
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(None, cpu) == "triton"  # allowed on CPU once the interpreter is on
    monkeypatch.setenv("PREFT_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        resolve_backend(None, cpu)


def test_import_and_cpu_ops_never_import_triton():
    code = (
        "import sys, torch; from preft_rl.kernels import AdapterTokenMetadata, apply_lora; "
        "meta = AdapterTokenMetadata.build(torch.tensor([0, -1], dtype=torch.int32)); "
        "apply_lora(torch.zeros(2, 4), torch.ones(2, 8), torch.ones(1, 2, 8), torch.ones(1, 4, 2), 1.0, meta); "
        "assert 'triton' not in sys.modules, 'triton was imported'; print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PREFT_KERNEL_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------- torch references vs naive math


def _naive_lora(out, x, a_list, b_list, scaling, index, widths):
    """Token by token with each adapter's unpadded (r_i, d) / (D, r_i) matrices, in float64."""
    out = out.clone()
    for t, slot in enumerate(index.tolist()):
        if slot < 0:
            continue
        x_t = x[t].double()
        parts = [b.double() @ (a.double() @ x_t) for a, b in zip(a_list[slot], b_list[slot])]
        out[t] = (out[t].double() + scaling[slot].double() * torch.cat(parts)).to(out.dtype)
    return out


@pytest.mark.parametrize("by_runs", [None, True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_slots,rank,d,widths", [(1, 1, 1, 64, (64,)), (37, 3, 16, 96, (96, 48, 48)), (130, 17, 64, 160, (160, 160))])
def test_lora_reference_matches_naive_with_rank_padding(dtype, num_tokens, num_slots, rank, d, widths, by_runs):
    gen = torch.Generator().manual_seed(num_tokens)
    ranks = [rank] + torch.randint(1, rank + 1, (num_slots - 1,), generator=gen).tolist()
    a_list = [[torch.randn(ri, d, generator=gen).to(dtype) for _ in widths] for ri in ranks]  # unpadded
    b_list = [[torch.randn(w, ri, generator=gen).to(dtype) for w in widths] for ri in ranks]
    lora_a = torch.zeros(num_slots, len(widths) * rank, d, dtype=dtype)  # zero-padded stack
    lora_b = torch.zeros(num_slots, sum(widths), rank, dtype=dtype)
    for slot, ri in enumerate(ranks):
        for s in range(len(widths)):
            lora_a[slot, s * rank : s * rank + ri] = a_list[slot][s]
        lora_b[slot, :, :ri] = torch.cat(b_list[slot])
    scaling = torch.rand(num_slots, generator=gen) + 0.5
    x = torch.randn(num_tokens, d, generator=gen).to(dtype)
    base = torch.randn(num_tokens, sum(widths), generator=gen).to(dtype)
    if by_runs is None:  # the engine's layout: requests of consecutive rows (prompt, then generated = -1)
        lengths = torch.randint(1, 24, (num_tokens,), generator=gen).tolist()
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).tolist()
        index = torch.tensor([slot if i < n // 2 + 1 else -1 for n, slot in zip(lengths, slots) for i in range(n)][:num_tokens],
                             dtype=torch.int32)
    else:
        index = torch.randint(-1, num_slots, (num_tokens,), generator=gen, dtype=torch.int32)
    index[0] = num_slots - 1
    metadata = AdapterTokenMetadata.build(index)
    if by_runs is None:
        got = apply_lora(base.clone(), x, lora_a, lora_b, scaling, metadata, output_slices=widths, backend="torch")
    else:
        got = lora_forward_reference(base.clone(), x, lora_a, lora_b, scaling, metadata, widths, by_runs=by_runs)
    want = _naive_lora(base, x, a_list, b_list, scaling, index, widths)
    off = index < 0
    assert torch.equal(got[off], base[off])
    atol = {torch.float32: 1e-4, torch.bfloat16: 0.0}[dtype]
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2**-7}[dtype]  # bf16: fp32 vs float64 math may round one ulp apart
    torch.testing.assert_close(got.float(), want.float(), atol=atol + ulp * want.abs().max().item(), rtol=ulp)


def test_reft_references_match_the_hf_interventions():
    from preft_rl.adapters.layers import DiReftIntervention, LoReftIntervention

    gen = torch.Generator().manual_seed(0)
    d, r = 48, 4
    lo = LoReftIntervention(d, r, 0.0, torch.device("cpu"), gen)
    di = DiReftIntervention(d, r, 0.0, torch.device("cpu"), None, gen)
    with torch.no_grad():  # move away from the no-op initialisation
        lo.learned_source.weight.add_(0.2 * torch.randn(r, d, generator=gen))
        lo.learned_source.bias.normal_(generator=gen)
        di.proj_layer.weight.normal_(generator=gen)
        di.learned_source.bias.normal_(generator=gen)
    h = torch.randn(10, d, generator=gen)
    index = torch.tensor([0, -1, 1, 0, -1, 1, 1, 0, -1, 0], dtype=torch.int32)
    meta = AdapterTokenMetadata.build(index)
    on = index >= 0
    with torch.no_grad():
        # Slot 1 holds the real adapter, slot 0 a random other one (so slots cannot be mixed up unnoticed).
        R = torch.stack([torch.linalg.qr(torch.randn(d, r, generator=gen)).Q.T, lo.rotate_layer.weight])
        W = torch.stack([torch.randn(r, d, generator=gen), lo.learned_source.weight])
        b = torch.stack([torch.randn(r, generator=gen), lo.learned_source.bias])
        got = apply_loreft(h.clone(), R, W, b, meta, backend="torch")
        sel = index == 1
        torch.testing.assert_close(got[sel], h[sel] + (h[sel] @ lo.learned_source.weight.T + lo.learned_source.bias - h[sel] @ lo.rotate_layer.weight.T) @ lo.rotate_layer.weight, atol=1e-5, rtol=1e-5)
        W1 = torch.stack([W[0], di.learned_source.weight])
        W2 = torch.stack([R[0], di.proj_layer.weight])
        b1 = torch.stack([b[0], di.learned_source.bias])
        got = apply_direft(h.clone(), W1, b1, W2, meta, backend="torch")
        torch.testing.assert_close(got[sel], h[sel] + (h[sel] @ di.learned_source.weight.T + di.learned_source.bias) @ di.proj_layer.weight, atol=1e-5, rtol=1e-5)
        slot0 = index == 0
        torch.testing.assert_close(got[slot0], h[slot0] + (h[slot0] @ W1[0].T + b1[0]) @ W2[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[~on], h[~on])


def test_autograd_torch_path_is_identity_off_the_prompt():
    """Gradients: identity for the base output, exactly zero for x at non-prompt rows; values = naive."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    base = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    a = torch.randn(4, 16, generator=gen, requires_grad=True)
    b = torch.randn(12, 4, generator=gen, requires_grad=True)
    prompt = torch.tensor([[True, True, False, False, False], [False, True, True, True, False]])
    y = prefill_lora(base, x, a, b, 0.5, prompt)
    want = base + 0.5 * prompt[..., None] * (x @ a.T @ b.T)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    g = torch.randn(2, 5, 12, generator=gen)
    y.backward(g)
    assert torch.equal(base.grad, g) and bool((x.grad[~prompt] == 0).all()) and bool((x.grad[prompt] != 0).all())
    h = torch.randn(2, 5, 16, generator=gen)
    w = torch.randn(4, 16, generator=gen)
    for out in (prefill_loreft(h, w, w * 2, torch.ones(4), prompt), prefill_direft(h, w, torch.ones(4), w, prompt)):
        assert torch.equal(out[~prompt], h[~prompt]) and not torch.equal(out[prompt], h[prompt])


# ---------------------------------------------------------------- the Triton suite, interpreted


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available(),
    reason="test_kernels_triton.py runs in this process already (interpreter on, or CUDA present)",
)
def test_triton_kernels_under_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "PREFT_KERNEL_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TRITON_TESTS)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 50 and "skipped" not in proc.stdout, log  # really ran, nothing skipped
    print(f"interpreted Triton suite: {passed.group(0)} in {time.perf_counter() - start:.1f}s")


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_reft_autograd_reference_equals_plain_math(method):
    """The torch autograd path of prefill_loreft / prefill_direft is the oracle the Triton gradients are tested against
    (test_kernels_triton.py), so it is itself checked here against the formulas written out row by row, in float64:
    LoReFT h + R^T (W h + b - R h), DiReFT h + W2^T (W1 h + b), at the selected rows only; values and every gradient."""
    from preft_rl.kernels import prefill_direft, prefill_loreft

    gen = torch.Generator().manual_seed(11)
    T, d, r = 7, 12, 3
    rows = torch.tensor([0, 2, 3, 6])
    h = torch.randn(T, d, generator=gen, dtype=torch.float64)
    first = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q.T.contiguous()  # R (LoReFT) or W1
    second = torch.randn(r, d, generator=gen, dtype=torch.float64)  # W (LoReFT) or W2
    bias = torch.randn(r, generator=gen, dtype=torch.float64)
    upstream = torch.randn(T, d, generator=gen, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (h, first, second, bias)]
        out = fn(*leaves)
        (out * upstream).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    def reference(h_, first_, second_, bias_):
        if method == "loreft":
            return prefill_loreft(h_, first_, second_, bias_, rows, backend="torch")
        return prefill_direft(h_, first_, bias_, second_, rows, backend="torch")

    def plain(h_, first_, second_, bias_):
        out = []
        for t in range(T):
            x = h_[t]
            if t not in rows.tolist():
                out.append(x)
            elif method == "loreft":  # R = first_, W = second_
                out.append(x + first_.T @ (second_ @ x + bias_ - first_ @ x))
            else:  # W1 = first_, W2 = second_
                out.append(x + second_.T @ (first_ @ x + bias_))
        return torch.stack(out)

    (got, got_grads), (want, want_grads) = grads(reference), grads(plain)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the reference computes in fp32
    for name, g, w in zip(("h", "first", "second", "bias"), got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")
    assert torch.equal(got[1], h[1]) and not torch.allclose(got[0], h[0])  # unselected rows untouched, selected changed
