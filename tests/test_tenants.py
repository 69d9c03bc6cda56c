"""TenantPreftModel: each row of one forward uses its own tenant's adapter, exactly as that tenant's own PreftModel
computes it (logits and gradients), whatever other tenants share the batch; tenants start as PreftModels with the
same seed do, save to the same files, and a tenant without rows is not touched by the backward."""

from __future__ import annotations

import pytest
import torch

from preft_rl.adapters import PreftConfig, PreftModel, get_preft_model, position_ids_from_attention_mask
from preft_rl.adapters.tenants import TenantPreftModel

CONFIGS = {
    "lora": dict(method="lora", r=4, alpha=8, seed=3),
    "loreft": dict(method="loreft", r=4, layers=[0, 1], seed=3),
    "loreft-first-last": dict(method="loreft", r=4, layers=[1], positions="f2+l1", share_first_last=False, seed=3),
    "direft": dict(method="direft", r=4, layers="all", seed=3),
}
TENANTS = ["alice", "bob", "carol"]


def perturb(adapter, seed: int) -> None:
    """Away from the no-op start, differently per tenant (so a row given the wrong tenant would show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter.adapter_named_parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


def batch(tokenizer):
    """Right-padded rows [prompt | completion | pad]; rows 0 and 3 (alice, carol) share a prompt."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [5, 6, 7, 8, 9], [20, 21, 22, 23, 24, 25], [30, 31]]
    completions = [[40, 41, 42], [43, 44], [45, 46, 47, 48], [49, 50], [51], [52, 53, 54]]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    am = torch.zeros_like(ids)
    pm = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        am[b, : len(p) + len(c)] = 1
        pm[b, : len(p)] = True
    return ids, am, pm


ROW_TENANTS = ["alice", None, "carol", "carol", "alice", "alice"]  # bob has no row


def row_loss(logits: torch.Tensor, ids: torch.Tensor, am: torch.Tensor, pm: torch.Tensor) -> torch.Tensor:
    """(B,) per-row summed log-likelihood of the completion tokens (what an RL loss reads; the shared-prompt forward
    gives logits exactly there)."""
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * (am[:, 1:].bool() & ~pm[:, 1:])).sum(-1)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("share_prompts", [False, True])
def test_each_row_equals_its_tenants_own_model(load_tiny, tokenizer, name, share_prompts):
    config = PreftConfig(**CONFIGS[name])
    tenants = TenantPreftModel(load_tiny(), config, TENANTS)
    for i, tenant in enumerate(TENANTS):
        perturb(tenants.tenant(tenant), seed=10 + i)
    ids, am, pm = batch(tokenizer)
    out = tenants(input_ids=ids, attention_mask=am, prompt_mask=pm, tenants=ROW_TENANTS, share_prompts=share_prompts).logits
    losses = row_loss(out, ids, am, pm)
    losses.sum().backward()

    # logits a loss reads: each row's last prompt token and its completion tokens (all the shared-prompt forward gives)
    needed = am.bool() & ~pm
    needed[torch.arange(len(ids)), pm.sum(-1) - 1] = True
    for tenant in [*TENANTS, None]:
        rows = [b for b, t in enumerate(ROW_TENANTS) if t == tenant]
        alone = load_tiny()
        if tenant is None:
            expected = alone(input_ids=ids, attention_mask=am).logits  # right padding: HF's positions are ours
        else:
            model = get_preft_model(alone, config)
            model.load_adapter_state_dict(tenants.tenant(tenant).adapter_state_dict())
            expected = model(input_ids=ids, attention_mask=am, prompt_mask=pm, share_prompts=share_prompts).logits
            row_loss(expected, ids, am, pm)[rows].sum().backward()
            grads = {key: p.grad for key, p in model.adapter_named_parameters()}
            ours = dict(tenants.tenant(tenant).adapter_named_parameters())
            for key, grad in grads.items():
                if not rows:  # a tenant with no row is not in the graph
                    assert ours[key].grad is None, key
                else:
                    torch.testing.assert_close(ours[key].grad, grad, atol=1e-5, rtol=1e-5, msg=f"{tenant} {key}")
        for b in rows:
            where = needed[b] if share_prompts else am[b].bool()  # padding's logits are never read
            torch.testing.assert_close(out[b, where], expected[b, where], atol=1e-5, rtol=1e-5, msg=f"row {b} ({tenant})")


def test_rows_without_a_tenant_and_disabled_adapters_are_the_base_bit_for_bit(load_tiny, tokenizer):
    tenants = TenantPreftModel(load_tiny(), PreftConfig(**CONFIGS["lora"]), TENANTS)
    for i, tenant in enumerate(TENANTS):
        perturb(tenants.tenant(tenant), seed=i)
    ids, am, pm = batch(tokenizer)
    base = load_tiny()(input_ids=ids, attention_mask=am, position_ids=position_ids_from_attention_mask(am)).logits
    with torch.no_grad():
        none = tenants(input_ids=ids, attention_mask=am, prompt_mask=pm, tenants=[None] * len(ids)).logits
        with tenants.disable_adapter():
            off = tenants(input_ids=ids, attention_mask=am, prompt_mask=pm, tenants=ROW_TENANTS).logits
    assert torch.equal(none, base) and torch.equal(off, base)


@pytest.mark.parametrize("name", ["lora", "loreft"])
def test_tenants_start_as_a_preft_model_with_the_same_seed_and_save_the_same_files(load_tiny, tokenizer, tmp_path, name):
    config = PreftConfig(**CONFIGS[name])
    tenants = TenantPreftModel(load_tiny(), config, TENANTS)
    alone = get_preft_model(load_tiny(), config).adapter_state_dict()
    for tenant in TENANTS:
        state = tenants.tenant(tenant).adapter_state_dict()
        assert state.keys() == alone.keys() and all(torch.equal(state[k], alone[k]) for k in state)
        assert tenants.tenant(tenant).is_identity()
    perturb(tenants.tenant("bob"), seed=1)
    tenants.tenant("bob").save_pretrained(tmp_path / "bob")
    loaded = PreftModel.from_pretrained(load_tiny(), tmp_path / "bob")
    ids, am, pm = batch(tokenizer)
    with torch.no_grad():
        ours = tenants(input_ids=ids, attention_mask=am, prompt_mask=pm, tenants=["bob"] * len(ids)).logits
        theirs = loaded(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not tenants.tenant("bob").is_identity() and tenants.tenant("alice").is_identity()


def test_bad_tenants_are_refused_by_name(load_tiny, tokenizer):
    config = PreftConfig(**CONFIGS["lora"])
    for bad, message in (([], "empty"), (["a.b"], "not allowed"), (["x:1"], "not allowed"), (["a", "a"], "more than once")):
        with pytest.raises(ValueError, match=message):
            TenantPreftModel(load_tiny(), config, bad)
    with pytest.raises(ValueError, match="dropout"):
        TenantPreftModel(load_tiny(), PreftConfig(method="lora", r=4, dropout=0.1), TENANTS)
    tenants = TenantPreftModel(load_tiny(), config, TENANTS)
    ids, am, pm = batch(tokenizer)
    with pytest.raises(ValueError, match="unknown tenants \\['dave'\\]"):
        tenants(input_ids=ids, attention_mask=am, prompt_mask=pm, tenants=["dave"] * len(ids))
    with pytest.raises(ValueError, match="one tenant name"):
        tenants(input_ids=ids, attention_mask=am, prompt_mask=pm, tenants=["alice"])
