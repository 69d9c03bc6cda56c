"""Many tenants in one GRPO run (preft_rl/trainers/multitenant.py): together equals alone, tenants are independent,
and each tenant learns its own objective. Tiny Llama, fp32, CPU, one process."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, Tenant
from preft_rl.trainers.multitenant import MultiTenantGRPOTrainer

pytest.importorskip("vllm")

NAMES = ["alice", "bob", "carol", "dave"]


def tenant_data(t: int, n: int = 12) -> Dataset:
    words = ["apples", "books", "cats", "dogs", "eggs", "figs"]
    return Dataset.from_list([{"prompt": f"tenant {t} asks {i} {words[(i + t) % len(words)]}?"} for i in range(n)])


def even_tokens(prompts, completions, completion_ids=None, **_):
    return [sum(i % 2 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]


def odd_tokens(prompts, completions, completion_ids=None, **_):
    return [sum(i % 2 == 1 for i in ids) / max(len(ids), 1) for ids in completion_ids]


def small_tokens(prompts, completions, completion_ids=None, **_):
    return [sum(i < 60 for i in ids) / max(len(ids), 1) for ids in completion_ids]


def first_token_even(prompts, completions, completion_ids=None, **_):
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


REWARDS = [even_tokens, odd_tokens, small_tokens, first_token_even]
LEARNING_RATES = [None, 5e-2, None, 1e-2]


def tenants() -> list[Tenant]:
    return [Tenant(name, tenant_data(t), [REWARDS[t]], learning_rate=LEARNING_RATES[t]) for t, name in enumerate(NAMES)]


def config(tmp_path, **overrides) -> PreftGRPOConfig:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
        max_steps=3, max_completion_length=6, learning_rate=3e-2, save_steps=0, disable_tqdm=True, loss_type="dapo",
        max_grad_norm=0.8,  # some tenants' steps are clipped and some not (a shared clip would clip them all)
        engine_kwargs={"max_num_batched_tokens": 512},
    )
    settings.update(overrides)
    return PreftGRPOConfig(**settings)


PREFT = dict(method="lora", r=4, alpha=8)


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
def test_tenants_trained_together_equal_each_trained_alone(tiny_llama_dir, tmp_path):
    """DESIGN invariant (issue 24): K=3 steps of 4 tenants together give, for each tenant, the adapter of that tenant
    trained alone with the same seed and data (max |diff| <= 1e-5). Per-tenant data order, sampling seeds, advantages,
    token normaliser (dapo, lengths differ per tenant), gradient clip (active on some tenants' steps only), learning
    rate (two tenants have their own) and Adam state all have to be the tenant's own for this to hold: a shared clip
    or a global token normaliser breaks it (checked by hand when this test was written: max diff 4.1e-2 and 4.3e-2)."""
    together = PreftGRPOTrainer(str(tiny_llama_dir), args=config(tmp_path / "together"), tenants=tenants(),
                                preft_config=PreftConfig(**PREFT))
    assert isinstance(together, MultiTenantGRPOTrainer)
    together.train()
    together.close()
    for t, name in enumerate(NAMES):
        lr = LEARNING_RATES[t] or 3e-2
        alone = PreftGRPOTrainer(str(tiny_llama_dir), [REWARDS[t]], args=config(tmp_path / name, learning_rate=lr),
                                 train_dataset=tenant_data(t), preft_config=PreftConfig(**PREFT))
        alone.train()
        alone.close()
        ours, theirs = adapter(tmp_path / "together" / "tenants" / name), adapter(tmp_path / name)
        assert ours.keys() == theirs.keys()
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        moved = max((theirs[k] - adapter_init(tiny_llama_dir)[k]).abs().max().item() for k in theirs)
        assert diff <= 1e-5, (name, diff)
        assert moved > 1e-3, (name, moved)  # the tenant really trained
    logs = [json.loads(line) for line in (tmp_path / "together" / "log.jsonl").read_text().splitlines()]
    norms = [entry[f"tenants/{name}/grad_norm"] for entry in logs for name in NAMES]
    assert min(norms) < 0.8 < max(norms)  # the clip acted on some tenants' steps and not on others


_INIT: dict = {}


def adapter_init(model_dir) -> dict[str, torch.Tensor]:
    if not _INIT:
        from transformers import AutoModelForCausalLM

        from preft_rl.adapters import get_preft_model

        _INIT.update(get_preft_model(AutoModelForCausalLM.from_pretrained(model_dir), PreftConfig(**PREFT, seed=0)).adapter_state_dict())
    return _INIT
