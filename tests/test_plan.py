"""`preft-rl plan`: the memory formulas against real models and measured runs.

The parameter and adapter counts are pinned to the HF model and PreftModel themselves, the engine's slot size to the
engine's own registry, and the training-phase prediction to peak memory measured on an H200 (Llama-3-8B shape,
docs/benchmarks/kernels-gpu/train_step.json), within the error stated in docs/design/scale.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preft_rl import PreftConfig, get_preft_model
from preft_rl.cli import main as cli
from preft_rl.plan import GiB, PRESETS, ModelShape, PlanInputs, adapter_params, engine_adapter_slot_elems, make_plan, training_activations

ROOT = Path(__file__).resolve().parents[1]


def test_parameter_counts_equal_the_hf_model_and_preft_model(tiny_llama_dir, load_tiny):
    shape = ModelShape.resolve(str(tiny_llama_dir))
    assert shape.params() == sum(p.numel() for p in load_tiny().parameters())
    for method in ("lora", "loreft", "direft"):
        model = get_preft_model(load_tiny(), PreftConfig(method=method, r=4))
        assert adapter_params(shape, method, 4) == sum(p.numel() for _, p in model.adapter_named_parameters()), method


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_equal_the_hf_model(preset):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**PRESETS[preset]))
    assert ModelShape.resolve(preset).params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_engine_slot_size_equals_the_engine_registry(tiny_llama_dir, method):
    from transformers import AutoConfig

    from preft_rl.engine.registry import AdapterRegistry, ModelShape as EngineShape

    registry = AdapterRegistry(method, EngineShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama_dir)), 4, 8,
                               torch.bfloat16, torch.device("cpu"))
    per_slot = registry.bytes_per_adapter() - (2 if method == "lora" else 0)  # less the LoRA scaling scalar
    assert engine_adapter_slot_elems(ModelShape.resolve(str(tiny_llama_dir)), method, 8, tp=1) * 2 == per_slot


def test_training_prediction_matches_the_measured_8b_peaks():
    """Peaks measured by scripts/gpu_train_step.py on an H200: weights + adapter and its gradient + activations +
    logits, no optimizer and no engine in that process. The no-checkpointing point calibrated the activation
    constant; the other two are predictions."""
    measured = json.loads((ROOT / "docs" / "benchmarks" / "kernels-gpu" / "train_step.json").read_text())
    cfg, train = measured["config"], measured["train"]
    shape = ModelShape.resolve("llama-3-8b")
    for name, rows, checkpointing in (("preft-lora", 16, True), ("preft-lora-1group", 8, True), ("preft-lora-1group-no-gc", 8, False)):
        inputs = PlanInputs(gpus=1, zero=0, batch=rows, prompt_len=cfg["prompt_len"], completion_len=cfg["completion_len"],
                            share_prompts=False, gradient_checkpointing=checkpointing)
        predicted = shape.params() * 2 + 8 * adapter_params(shape, "lora", 16) + sum(training_activations(shape, inputs, rows).values())
        error = predicted / GiB / train[name]["peak_gib"] - 1
        assert abs(error) < 0.04, (name, predicted / GiB, train[name]["peak_gib"])


def test_70b_on_8_gpus_fits_with_zero3_and_tp4_and_says_what_to_change_otherwise():
    shape = ModelShape.resolve("llama-3-70b")
    good = make_plan(shape, PlanInputs(gpus=8, gpu_memory_gib=80, zero=3, tp=4, prompt_len=512, completion_len=1024, batch=8))
    assert good.fits, good.problems
    assert 0 < sum(good.rollout.values()) <= 80 * GiB and sum(good.training.values()) <= 80 * GiB
    assert good.max_sequences >= 4 * 8 and good.max_batch >= 8
    zero2 = make_plan(shape, PlanInputs(gpus=8, gpu_memory_gib=80, zero=2, tp=1, prompt_len=512, completion_len=1024, batch=8))
    assert not zero2.fits and any("use --zero 3" in p for p in zero2.problems)
    many = make_plan(shape, PlanInputs(gpus=8, gpu_memory_gib=80, zero=3, tp=4, adapters=512, prompt_len=512, completion_len=1024))
    assert not many.fits and any("adapter slots" in p and "fewer --adapters" in p for p in many.problems)
    no_gc = make_plan(shape, PlanInputs(gpus=8, gpu_memory_gib=80, zero=3, tp=4, batch=64, gradient_checkpointing=False))
    assert any(f"use --batch {no_gc.max_batch}" in p and "gradient checkpointing" in p for p in no_gc.problems)


def test_cli_prints_the_plan_and_rejects_bad_values(capsys):
    assert cli(["plan", "--model", "llama-3-8b", "--gpus", "1", "--gpu-memory", "141", "--zero", "0"]) == 0
    out = capsys.readouterr().out
    assert "rollout phase, per GPU" in out and "training phase, per GPU" in out and "fits." in out
    assert cli(["plan", "--model", "llama-3-70b", "--gpus", "1", "--zero", "0"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert cli(["plan", "--model", "llama-3-8b", "--gpus", "4", "--tp", "3"]) == 2
    assert "--tp 3 must divide --gpus 4" in capsys.readouterr().err
    assert cli(["plan", "--model", "no-such-model-xyz"]) == 2
    assert "no model config for 'no-such-model-xyz'" in capsys.readouterr().err


def test_tenants_add_their_adapter_state_and_slots_and_their_rows_per_micro_batch(capsys):
    """--tenants N: every process holds N adapters with their gradients and Adam moments (sharded as ZeRO shards them),
    the engine one slot per tenant, and a micro-batch holds --batch rows of each tenant trained in the step; its
    activations are those of --tenants-per-forward tenants' rows."""
    from preft_rl.plan import tenant_bytes

    shape = ModelShape.resolve("llama-3-8b")
    common = dict(gpus=8, gpu_memory_gib=80, zero=2, tp=1, prompt_len=512, completion_len=512, batch=2)
    one, many = make_plan(shape, PlanInputs(**common)), make_plan(shape, PlanInputs(**common, tenants=64, tenants_per_step=4))
    fixed = lambda plan: sum(v for k, v in plan.training.items() if not k.startswith(("activations", "logits")))  # noqa: E731
    slots = lambda plan: next(v for k, v in plan.rollout.items() if k.startswith("engine adapter slots"))  # noqa: E731
    slot = engine_adapter_slot_elems(shape, "lora", 16, 1) * 2
    assert fixed(many) - fixed(one) == pytest.approx(63 * (tenant_bytes(shape, PlanInputs(**common)) - slot))
    assert slots(many) == pytest.approx(64 * slot) and many.inputs.adapters == 64
    rows = lambda plan: sum(v for k, v in plan.training.items() if k.startswith(("activations", "logits")))  # noqa: E731
    assert rows(many) == pytest.approx(sum(training_activations(shape, many.inputs, 2 * 4).values()))
    assert rows(many) > rows(one)
    pieces = make_plan(shape, PlanInputs(**common, tenants=64, tenants_per_step=4, tenants_per_forward=1))
    assert rows(pieces) == pytest.approx(rows(one)) and fixed(pieces) == pytest.approx(fixed(many))
    assert cli(["plan", "--model", "llama-3-8b", "--gpus", "8", "--tenants", "64", "--tenants-per-step", "4"]) in (0, 1)
    out = capsys.readouterr().out
    assert "64 tenants" in out and "each further tenant adds" in out and "per tenant (4 tenants per step, 4 per forward)" in out
    assert cli(["plan", "--model", "llama-3-8b", "--tenants", "4", "--tenants-per-step", "5"]) == 2
    assert "--tenants-per-step must be in [1, --tenants=4]" in capsys.readouterr().err


def test_tenant_offload_keeps_only_the_steps_tenants_on_the_gpu_and_the_others_in_host_memory_or_on_disk(capsys):
    """--tenant-offload: the GPU holds --tenants-per-step tenants' adapters, moments, gradients and engine slots, as a
    run with that many tenants does; the waiting tenants take 12 bytes per adapter parameter (fp32 weights and two Adam
    moments) of host memory or disk per process, which is what the trainer's store writes per trained tenant (plus a
    safetensors header and the one-element step counters)."""
    from preft_rl.plan import offloaded_tenant_bytes, tenant_bytes

    shape = ModelShape.resolve("llama-3-8b")
    common = dict(gpus=8, gpu_memory_gib=80, zero=0, tp=1, prompt_len=512, completion_len=512, batch=2)
    few = make_plan(shape, PlanInputs(**common, tenants=8))
    offloaded = make_plan(shape, PlanInputs(**common, tenants=1000, tenants_per_step=8, tenant_offload="disk"))
    assert offloaded.training == few.training and offloaded.rollout == few.rollout
    waiting = next(v for k, v in offloaded.host.items() if k.startswith("992 waiting tenants") and k.endswith("(disk)"))
    assert waiting == 992 * 12 * adapter_params(shape, "lora", 16)
    assert tenant_bytes(shape, offloaded.inputs) == 0 and offloaded_tenant_bytes(shape, offloaded.inputs) == 12 * adapter_params(shape, "lora", 16)
    assert cli(["plan", "--model", "llama-3-8b", "--zero", "0", "--tenants", "1000", "--tenants-per-step", "8",
                "--tenant-offload", "cpu"]) in (0, 1)
    out = capsys.readouterr().out
    assert "992 waiting tenants: adapter + Adam moments (host memory)" in out and "adds nothing on the GPU" in out
    assert cli(["plan", "--model", "llama-3-8b", "--zero", "2", "--tenants", "10", "--tenants-per-step", "2",
                "--tenant-offload", "disk"]) == 2
    assert "--tenant-offload runs under DDP (--zero 0), not ZeRO-2" in capsys.readouterr().err
