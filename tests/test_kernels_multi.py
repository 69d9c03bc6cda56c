"""Multi-adapter differentiable prefill ops (kernels/multi_prefill.py) against a per-adapter loop of the single-adapter
ops: values and the gradients of the input, base_out and every adapter weight (DESIGN.md invariant 6).

The grouped torch path runs here over the full cross-product of small odd shapes. The Triton path runs natively on
CUDA, or on CPU in a child pytest with TRITON_INTERPRET=1 (`test_triton_path_under_interpreter`, which runs the
`test_triton_*` tests of this file; the interpreter must be on before triton is imported). Run them directly with:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_kernels_multi.py -k test_triton_

Every case gives each adapter its own random weights and scaling, leaves adapter slot 1 without rows when N >= 3, and
puts some rows at -1 (T > 1), so a wrong slot, a missing scaling or a leak into -1 rows shows up as a mismatch.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from preft_rl.kernels import AdapterTokenMetadata, prefill_direft, prefill_lora, prefill_loreft
from preft_rl.kernels.multi_prefill import prefill_direft_multi, prefill_lora_multi, prefill_loreft_multi

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_DEVICE = "cpu" if INTERPRETED else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None,
    reason="no GPU and TRITON_INTERPRET is not 1: run by test_triton_path_under_interpreter in a child process",
)

# dtype -> (atol, rtol), scaled by the reference's largest magnitude (weight gradients sum over rows).
# The torch path runs the same single-adapter maths on the same rows in the same order, so it is held to ~1 ulp;
# Triton as in test_kernels_triton.py (bf16: ~2 ulps, one for the interpreter's truncating bf16 stores).
TORCH_TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (8e-3, 8e-3)}
TRITON_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}
METHODS = ("lora", "loreft", "direft")
NAMES = {  # output, then the leaves in argument order
    "lora": ("out", "base_out", "x", "lora_a", "lora_b"),
    "loreft": ("out", "h", "rotation", "weight", "bias"),
    "direft": ("out", "h", "weight", "bias", "proj"),
}
EMPTY_SLOT = 1  # adapter slot with no rows whenever N >= 3


def case_id(case: dict) -> str:
    return "-".join(f"{k}{str(v).replace('torch.', '')}" for k, v in case.items())


def generator_for(case: dict) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))


def make_index(num_rows: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """(T,) int64 adapter slot per row: slot EMPTY_SLOT unused when N >= 3, about a quarter -1 with at least one -1
    row when T > 1, and at least one row with an adapter."""
    used = torch.tensor([s for s in range(num_slots) if num_slots < 3 or s != EMPTY_SLOT])
    index = used[torch.randint(0, len(used), (num_rows,), generator=gen)]
    index[torch.rand(num_rows, generator=gen) < 0.25] = -1
    if num_rows > 1:
        index[num_rows // 2] = -1
    if bool((index < 0).all()):
        index[0] = used[-1]
    return index


def make_case(method: str, num_rows: int, d: int, rank: int, num_slots: int, dtype, gen, weight_dtype=None):
    """Leaf tensors (no grad yet), the multi op and the per-adapter loop of single-adapter torch ops.
    `multi(leaves, index, backend)` and `loop(leaves, index, scaling_override=None)` both return the new tensor."""
    weight_dtype = weight_dtype or dtype
    if method == "lora":
        d_out = d + 8  # != d_in, so a transposed weight cannot pass
        base = torch.randn(num_rows, d_out, generator=gen).to(dtype)
        x = torch.randn(num_rows, d, generator=gen).to(dtype)
        lora_a = (torch.randn(num_slots, rank, d, generator=gen) / d**0.5).to(weight_dtype)
        lora_b = (torch.randn(num_slots, d_out, rank, generator=gen) / rank**0.5).to(weight_dtype)
        scaling = 0.5 + torch.rand(num_slots, generator=gen) * 1.5  # (N,) distinct per adapter

        def multi(t, index, backend):
            return prefill_lora_multi(*t, scaling.to(t[0].device), index, backend=backend)

        def loop(t, index, scaling_override=None):
            out = t[0]
            for slot in range(num_slots):
                rows = index == slot
                if rows.any():
                    s = float(scaling[slot]) if scaling_override is None else scaling_override
                    out = prefill_lora(out, t[1], t[2][slot], t[3][slot], s, rows, backend="torch")
            return out

        return [base, x, lora_a, lora_b], multi, loop

    h = torch.randn(num_rows, d, generator=gen).to(dtype)
    bias = (0.5 * torch.randn(num_slots, rank, generator=gen)).to(weight_dtype)
    if method == "loreft":
        rotation = torch.linalg.qr(torch.randn(num_slots, d, rank, generator=gen)).Q.transpose(1, 2)  # (N, r, d)
        weight = rotation + 0.3 * torch.randn(num_slots, rank, d, generator=gen) / d**0.5
        leaves = [h, rotation.contiguous().to(weight_dtype), weight.to(weight_dtype), bias]

        def multi(t, index, backend):
            return prefill_loreft_multi(*t, index, backend=backend)

        def single(out, t, slot, rows):
            return prefill_loreft(out, t[1][slot], t[2][slot], t[3][slot], rows, backend="torch")

    else:
        w1 = torch.randn(num_slots, rank, d, generator=gen) / d**0.5
        w2 = torch.randn(num_slots, rank, d, generator=gen) / rank**0.5
        leaves = [h, w1.to(weight_dtype), bias, w2.to(weight_dtype)]

        def multi(t, index, backend):
            return prefill_direft_multi(*t, index, backend=backend)

        def single(out, t, slot, rows):
            return prefill_direft(out, t[1][slot], t[2][slot], t[3][slot], rows, backend="torch")

    def loop(t, index, scaling_override=None):
        out = t[0]
        for slot in range(num_slots):
            rows = index == slot
            if rows.any():
                out = single(out, t, slot, rows)
        return out

    return leaves, multi, loop


def run(fn, tensors: list[torch.Tensor], grad_out: torch.Tensor, device) -> list[torch.Tensor]:
    """[output, grad of each leaf] on the CPU, after fn(leaves).backward(grad_out) on `device`."""
    leaves = [t.detach().clone().to(device).requires_grad_() for t in tensors]
    out = fn(leaves)
    out.backward(grad_out.to(device))
    return [out.detach().cpu()] + [leaf.grad.cpu() for leaf in leaves]


def max_rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = max(1.0, ref.abs().max().item())
    return (got.float() - ref.float()).abs().max().item() / scale


def assert_matches(got: list, ref: list, names: tuple, tolerance: tuple[float, float]) -> None:
    atol, rtol = tolerance
    for name, g, r in zip(names, got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape, (name, g.dtype, r.dtype, g.shape, r.shape)
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.float(), r.float(), atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def assert_invariants(method: str, got: list, tensors: list, index: torch.Tensor, grad_out: torch.Tensor, num_slots: int):
    """-1 rows: output = input bit for bit, gradient of the input there = upstream (ReFT, LoRA base_out) or exactly 0
    (LoRA x); an adapter without rows: exactly-zero weight gradients."""
    off = index < 0
    assert torch.equal(got[0][off], tensors[0][off])
    if method == "lora":
        assert torch.equal(got[1][off], grad_out[off]) and torch.equal(got[1][~off], grad_out[~off])  # d base_out = g
        assert bool((got[2][off] == 0).all())
    else:
        assert torch.equal(got[1][off], grad_out[off])
    weight_grads = got[3:] if method == "lora" else got[2:]  # (N, ...) each
    if num_slots >= 3:
        for grad in weight_grads:
            assert bool((grad[EMPTY_SLOT] == 0).all())
    for slot in set(index[index >= 0].tolist()):  # every used adapter really gets a gradient
        for grad in weight_grads:
            assert grad[slot].abs().max() > 0


# ---------------------------------------------------------------- grouped torch path


TORCH_CASES = [
    dict(method=m, T=t, d=d, r=r, N=n, dtype=dt)
    for m, t, d, r, n, dt in itertools.product(METHODS, [1, 7, 33], [24, 40], [1, 3, 8], [1, 3, 5], [torch.float32, torch.bfloat16])
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_torch_path_matches_per_adapter_loop(case):
    gen = generator_for(case)
    tensors, multi, loop = make_case(case["method"], case["T"], case["d"], case["r"], case["N"], case["dtype"], gen)
    index = make_index(case["T"], case["N"], gen)
    grad_out = torch.randn(tensors[0].shape, generator=gen).to(case["dtype"])
    got = run(lambda t: multi(t, index, "torch"), tensors, grad_out, "cpu")
    ref = run(lambda t: loop(t, index), tensors, grad_out, "cpu")
    assert_matches(got, ref, NAMES[case["method"]], TORCH_TOLERANCE[case["dtype"]])
    assert_invariants(case["method"], got, tensors, index, grad_out, case["N"])


@pytest.mark.parametrize("method", METHODS)
def test_torch_path_bf16_activations_with_fp32_weights(method):
    """The trainer's layout: bf16 activations, fp32 adapter weights (gradients come back in each leaf's dtype)."""
    gen = torch.Generator().manual_seed(7)
    tensors, multi, loop = make_case(method, 33, 40, 8, 5, torch.bfloat16, gen, weight_dtype=torch.float32)
    index = make_index(33, 5, gen)
    grad_out = torch.randn(tensors[0].shape, generator=gen).to(torch.bfloat16)
    got = run(lambda t: multi(t, index, "torch"), tensors, grad_out, "cpu")
    ref = run(lambda t: loop(t, index), tensors, grad_out, "cpu")
    assert_matches(got, ref, NAMES[method], TORCH_TOLERANCE[torch.bfloat16])
    assert_invariants(method, got, tensors, index, grad_out, 5)


@pytest.mark.parametrize("method", METHODS)
def test_the_comparison_catches_a_wrong_slot_or_a_missing_scaling(method):
    """The loop oracle is sensitive: shifting every row to the next adapter (or dropping LoRA's scaling) moves the
    values and the gradients far beyond the tolerance, so an op that mixed up slots or scaling would fail."""
    gen = torch.Generator().manual_seed(3)
    tensors, multi, loop = make_case(method, 33, 24, 3, 3, torch.float32, gen)
    index = make_index(33, 3, gen)
    grad_out = torch.randn(tensors[0].shape, generator=gen)
    got = run(lambda t: multi(t, index, "torch"), tensors, grad_out, "cpu")
    shifted = torch.where(index >= 0, (index + 1) % 3, index)
    wrong = [run(lambda t: loop(t, shifted), tensors, grad_out, "cpu")]
    if method == "lora":
        wrong.append(run(lambda t: loop(t, index, scaling_override=1.0), tensors, grad_out, "cpu"))
    for ref in wrong:
        with pytest.raises(AssertionError):
            assert_matches(got[:1], ref[:1], NAMES[method], TORCH_TOLERANCE[torch.float32])
        with pytest.raises(AssertionError):
            assert_matches(got[2:], ref[2:], NAMES[method][2:], TORCH_TOLERANCE[torch.float32])


@pytest.mark.parametrize("method", METHODS)
def test_leading_dims_and_prebuilt_metadata_give_the_flat_result(method):
    """(B, S, d) inputs with a (B, S) index, a flat (B*S,) index or a prebuilt metadata: the same values, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    tensors, multi, _ = make_case(method, 12, 24, 3, 3, torch.float32, gen)
    index = make_index(12, 3, gen)
    flat = multi(tensors, index, "torch")
    batched = [tensors[0].reshape(3, 4, -1), *tensors[1:]]
    if method == "lora":
        batched[1] = tensors[1].reshape(3, 4, -1)
    for idx in (index.reshape(3, 4), index, AdapterTokenMetadata.build(index)):
        out = multi(batched, idx, "torch")
        assert out.shape == batched[0].shape and torch.equal(out.reshape(flat.shape), flat)


@pytest.mark.parametrize("method", METHODS)
def test_no_adapter_rows_returns_the_input(method):
    gen = torch.Generator().manual_seed(1)
    tensors, multi, _ = make_case(method, 7, 24, 3, 3, torch.float32, gen)
    assert multi(tensors, torch.full((7,), -1), "torch") is tensors[0]


def test_errors_name_the_bad_value_and_the_fix():
    gen = torch.Generator().manual_seed(2)
    (base, x, lora_a, lora_b), _, _ = make_case("lora", 7, 24, 3, 3, torch.float32, gen)
    (h, rotation, weight, bias), _, _ = make_case("loreft", 7, 24, 3, 3, torch.float32, gen)
    with pytest.raises(ValueError, match=r"token_adapter_index has shape \(6,\); expected the input's leading dims \(7,\)"):
        prefill_lora_multi(base, x, lora_a, lora_b, 1.0, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="uses slot 3 but the stacked weights hold 3 slots"):
        prefill_loreft_multi(h, rotation, weight, bias, torch.tensor([0, 3, -1, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="must be an integer tensor"):
        prefill_direft_multi(h, weight, bias, weight, torch.zeros(7))
    with pytest.raises(ValueError, match="the metadata covers 5 rows but the input has 7"):
        prefill_lora_multi(base, x, lora_a, lora_b, 1.0, AdapterTokenMetadata.build(torch.zeros(5, dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"scaling has shape \(2,\); expected \(3,\)"):
        prefill_lora_multi(base, x, lora_a, lora_b, torch.ones(2), torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias has shape \(3, 2\); expected \(3, 3\)"):
        prefill_loreft_multi(h, rotation, weight, bias[:, :2], torch.zeros(7, dtype=torch.long))


# ---------------------------------------------------------------- Triton path (CUDA, or the interpreter in a child)


def pairwise_cases() -> list[dict]:
    """Every pair of factor values in some case (the full product is too slow interpreted)."""
    from test_kernels_triton import pairwise

    factors = {
        "method": list(METHODS),
        "T": [1, 7, 33],
        "d": [24, 40],
        "r": [1, 3, 8],
        "N": [1, 3, 5],
        "dtype": [torch.float32, torch.bfloat16],
        "weights": ["same", "fp32"],
    }
    return pairwise(factors)


TRITON_CASES = pairwise_cases()


@pytest.fixture
def poisoned_workspaces(monkeypatch):
    """Kernel scratch buffers start as NaN, so reading anything a kernel did not write shows."""
    from preft_rl.kernels import triton_common

    monkeypatch.setattr(triton_common, "POISON_WORKSPACES", True)


def launches() -> int:
    from preft_rl.kernels import triton_common

    return sum(triton_common.LAUNCHES.values())


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_triton_path_matches_per_adapter_loop(case, poisoned_workspaces):
    gen = generator_for(case)
    weight_dtype = torch.float32 if case["weights"] == "fp32" else None
    tensors, multi, loop = make_case(case["method"], case["T"], case["d"], case["r"], case["N"], case["dtype"], gen, weight_dtype)
    index = make_index(case["T"], case["N"], gen)
    grad_out = torch.randn(tensors[0].shape, generator=gen).to(case["dtype"])
    before = launches()
    got = run(lambda t: multi(t, index.to(TRITON_DEVICE), "triton"), tensors, grad_out, TRITON_DEVICE)
    assert launches() > before  # the kernels ran, not the torch path
    ref = run(lambda t: loop(t, index), tensors, grad_out, "cpu")
    assert_matches(got, ref, NAMES[case["method"]], TRITON_TOLERANCE[case["dtype"]])
    assert_invariants(case["method"], got, tensors, index, grad_out, case["N"])


@needs_triton
@pytest.mark.parametrize("method", METHODS)
def test_triton_no_adapter_rows_launches_nothing(method):
    gen = torch.Generator().manual_seed(1)
    tensors, multi, _ = make_case(method, 7, 24, 3, 3, torch.float32, gen)
    tensors = [t.to(TRITON_DEVICE) for t in tensors]
    before = launches()
    assert multi(tensors, torch.full((7,), -1, device=TRITON_DEVICE), "triton") is tensors[0]
    assert launches() == before


@needs_triton
@pytest.mark.parametrize("method", METHODS)
def test_triton_leading_dims_match_the_torch_path(method):
    """(B, S, d) inputs with a (B, S) index through the autograd Function: values and gradients as the torch path."""
    gen = torch.Generator().manual_seed(9)
    tensors, multi, _ = make_case(method, 12, 24, 3, 3, torch.float32, gen)
    tensors = [tensors[0].reshape(3, 4, -1), *tensors[1:]]
    if method == "lora":
        tensors[1] = tensors[1].reshape(3, 4, -1)
    index = make_index(12, 3, gen).reshape(3, 4)
    grad_out = torch.randn(tensors[0].shape, generator=gen)
    got = run(lambda t: multi(t, index.to(TRITON_DEVICE), "triton"), tensors, grad_out, TRITON_DEVICE)
    ref = run(lambda t: multi(t, index, "torch"), tensors, grad_out, "cpu")
    assert_matches(got, ref, NAMES[method], TRITON_TOLERANCE[torch.float32])


@pytest.mark.skipif(
    INTERPRETED or torch.cuda.is_available(),
    reason="the test_triton_* tests run in this process already (interpreter on, or CUDA present)",
)
def test_triton_path_under_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "PREFT_KERNEL_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "test_triton_ and not under_interpreter"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == len(TRITON_CASES) + 6 and "skipped" not in proc.stdout, log
    print(f"interpreted multi-adapter Triton tests: {passed.group(0)} in {time.perf_counter() - start:.1f}s")
