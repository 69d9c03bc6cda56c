"""Two adapters on one frozen base (PPO's policy and critic): switching between them per forward is exact."""

from __future__ import annotations

import pytest
import torch

from preft_rl import PreftConfig, get_preft_model
from test_adapters import randomize_adapter

POLICY = dict(method="lora", r=4, alpha=8, target_modules="all-linear")
CRITIC = dict(method="lora", r=2, alpha=4, target_modules="all-linear", adapter_scope="all")


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 12), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -3:] = 0  # right padding in row 1
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[0, :7], prompt_mask[1, :5] = True, True
    return ids, attention_mask, prompt_mask


@pytest.fixture
def shared(load_tiny):
    base = load_tiny()
    policy = get_preft_model(base, PreftConfig(**POLICY, seed=0))
    randomize_adapter(policy, seed=1)
    critic = get_preft_model(base, PreftConfig(**CRITIC, seed=2))
    randomize_adapter(critic, seed=3)
    return policy, critic


def test_a_critic_forward_leaves_the_policy_bit_identical(shared, load_tiny):
    policy, critic = shared
    ids, am, pm = inputs()
    with torch.no_grad():
        before = policy(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
        critic_hidden = critic.hidden_states(ids, am, pm)
        after = policy(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
        with policy.disable_adapter():
            base_logits = policy(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    assert torch.equal(before, after)
    # the policy alone on a fresh base gives the same logits: the critic below it changes nothing for the policy
    alone = get_preft_model(load_tiny(), PreftConfig(**POLICY, seed=0))
    alone.load_adapter_state_dict(policy.adapter_state_dict())
    critic_alone = get_preft_model(load_tiny(), PreftConfig(**CRITIC, seed=2))
    critic_alone.load_adapter_state_dict(critic.adapter_state_dict())
    with torch.no_grad():
        assert torch.equal(alone(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, before)
        # and the critic runs with the policy off: its hidden states equal those of the critic alone on a fresh base
        assert torch.equal(critic_alone.hidden_states(ids, am, pm), critic_hidden)
        with alone.disable_adapter():
            assert torch.equal(alone(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, base_logits)
    assert not torch.equal(before, base_logits)  # the adapters really act


def test_each_adapter_owns_its_parameters_and_file_keys(shared):
    policy, critic = shared
    policy_keys, critic_keys = set(policy.adapter_state_dict()), set(critic.adapter_state_dict())
    assert policy_keys == critic_keys  # both in the plain file format, as if each were alone on the base
    policy_ids = {id(p) for _, p in policy.adapter_named_parameters()}
    critic_ids = {id(p) for _, p in critic.adapter_named_parameters()}
    assert policy_ids and critic_ids and not policy_ids & critic_ids
    trainable = {id(p) for p in policy.base_model.parameters() if p.requires_grad}
    assert trainable == policy_ids | critic_ids  # the base is frozen, both adapters train


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_only_the_adapter_that_ran(load_tiny, checkpointing):
    """A loss on the critic's hidden states gives the critic gradients and the policy none, also when gradient
    checkpointing re-runs each layer in backward (it must re-select the same adapter)."""
    grads = {}
    for run in ("plain", "checkpointed") if checkpointing else ("plain",):
        base = load_tiny()
        if run == "checkpointed":
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.train()
        policy = get_preft_model(base, PreftConfig(**POLICY, seed=0))
        randomize_adapter(policy, seed=1)
        critic = get_preft_model(base, PreftConfig(**CRITIC, seed=2))
        randomize_adapter(critic, seed=3)
        ids, am, pm = inputs()
        critic.hidden_states(ids, am, pm).pow(2).mean().backward()
        assert all(p.grad is None for _, p in policy.adapter_named_parameters())
        grads[run] = {n: p.grad.clone() for n, p in critic.adapter_named_parameters()}
        policy.zero_grad(set_to_none=True)
        policy(input_ids=ids, attention_mask=am, prompt_mask=pm).logits.float().pow(2).mean().backward()
        assert all(p.grad is None for _, p in critic.adapter_named_parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in policy.adapter_named_parameters())
    if checkpointing:
        for name, grad in grads["plain"].items():
            torch.testing.assert_close(grads["checkpointed"][name], grad, rtol=1e-5, atol=1e-6)


def test_two_reft_adapters_cannot_share_a_layer(load_tiny):
    base = load_tiny()
    get_preft_model(base, PreftConfig(method="loreft", r=2, layers=[0, 1], positions="f2+l2"))
    with pytest.raises(ValueError, match=r"decoder layers \[1\] already carry a ReFT intervention"):
        get_preft_model(base, PreftConfig(method="direft", r=2, layers=[1], positions="all", adapter_scope="all"))
    get_preft_model(base, PreftConfig(method="lora", r=2, adapter_scope="all"))  # a LoRA critic beside a ReFT policy is fine


@pytest.mark.parametrize("method", ["lora", "loreft"])
def test_unload_gives_back_the_base_bit_for_bit(load_tiny, method):
    base = load_tiny()
    ids, am, pm = inputs()
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=am).logits
    model = get_preft_model(base, PreftConfig(method=method, r=4, seed=0))
    randomize_adapter(model, seed=1)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, before)
    assert model.unload() is base
    assert not any(".lora_" in name or "preft_reft" in name for name, _ in base.named_modules())
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=am).logits, before)
    with pytest.raises(RuntimeError, match="unloaded"):
        model(input_ids=ids, attention_mask=am, prompt_mask=pm)
    with pytest.raises(RuntimeError, match="already unloaded"):
        model.unload()
    again = get_preft_model(base, PreftConfig(method=method, r=4, seed=0))  # the base takes a new adapter
    with torch.no_grad():
        fresh = again(input_ids=ids, attention_mask=am, prompt_mask=pm).logits  # a fresh adapter is a no-op
    real = am.bool()  # (pad positions get other position ids through PreftModel)
    assert torch.equal(fresh[real], before[real])


@pytest.mark.parametrize("first", ["policy", "critic"])
def test_two_adapters_unload_in_either_order(shared, load_tiny, first):
    policy, critic = shared
    ids, am, pm = inputs()
    with torch.no_grad():
        expected = {"policy": policy(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, "critic": critic.hidden_states(ids, am, pm)}
    gone, kept = (policy, critic) if first == "policy" else (critic, policy)
    base = gone.unload()
    with torch.no_grad():
        out = kept(input_ids=ids, attention_mask=am, prompt_mask=pm).logits if kept is policy else kept.hidden_states(ids, am, pm)
    assert torch.equal(out, expected["critic" if kept is critic else "policy"])
    kept.unload()
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids, attention_mask=am).logits, load_tiny()(input_ids=ids, attention_mask=am).logits)


def test_unload_refuses_and_changes_nothing_when_a_layer_was_replaced(load_tiny):
    base = load_tiny()
    model = get_preft_model(base, PreftConfig(method="lora", r=4, seed=0))
    attn = base.model.layers[1].self_attn
    attn.v_proj = torch.nn.Linear(attn.v_proj.in_features, attn.v_proj.out_features)  # someone else's module
    with pytest.raises(RuntimeError, match="another adapter wraps 'v_proj'"):
        model.unload()
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "PreftLoraLinear"  # nothing was undone
    ids, am, pm = inputs()
    model(input_ids=ids, attention_mask=am, prompt_mask=pm)  # and the model still works
