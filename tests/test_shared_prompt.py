"""Each prompt computed once in the training forward: log-probs and adapter gradients equal the plain forward."""

from __future__ import annotations

import pytest
import torch

from preft_rl import PreftConfig, get_preft_model
from preft_rl.adapters.shared_prompt import pack_prompts
from preft_rl.trainers.grpo_core import selective_log_softmax
from test_adapters import randomize_adapter

CONFIGS = {
    "lora": PreftConfig(method="lora", r=4, alpha=8, target_modules="all-linear", seed=0),
    "loreft": PreftConfig(method="loreft", r=4, positions="f2+l2", seed=0),
    "all-token lora": PreftConfig(method="lora", r=4, alpha=8, target_modules="all-linear", adapter_scope="all", seed=0),
}


def rows():
    """Right-padded [prompt | completion | pad]: a group of 3 (prompt 9), a group of 2 (prompt 5), a lone prompt (7)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g) for n in (9, 5, 7)]
    layout = [(0, 4), (0, 1), (0, 6), (1, 3), (1, 8), (2, 5)]  # (prompt, completion length)
    width = max(len(prompts[p]) + c for p, c in layout)
    ids = torch.zeros(len(layout), width, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    completion_mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, c) in enumerate(layout):
        n = len(prompts[p])
        ids[b, :n] = prompts[p]
        ids[b, n : n + c] = torch.randint(5, 300, (c,), generator=g)
        attention_mask[b, : n + c] = 1
        prompt_mask[b, :n] = True
        completion_mask[b, n : n + c] = True
    return ids, attention_mask, prompt_mask, completion_mask


def completion_logps(model, share: bool):
    ids, am, pm, cm = rows()
    first = int(pm.sum(-1).min()) - 1
    keep = ids.shape[1] - first
    logits = model(input_ids=ids, attention_mask=am, prompt_mask=pm, logits_to_keep=keep, share_prompts=share).logits
    logps = selective_log_softmax(logits[:, :-1], ids[:, first + 1 :])
    return logps * cm[:, first + 1 :]


def test_packing_puts_each_prompt_once_and_hides_siblings():
    ids, am, pm, _ = rows()
    packed = pack_prompts(ids, am, pm, first=int(pm.sum(-1).min()) - 1, dtype=torch.float32)
    assert packed.num_rows == 3
    assert packed.input_ids[0, :9].tolist() == ids[0, :9].tolist()
    assert packed.input_ids[0, 9:13].tolist() == ids[0, 9:13].tolist()  # then the group's completions, one after another
    allowed = packed.attention_mask[0, 0] == 0
    assert allowed[9, :10].all() and not allowed[13, 9:13].any() and allowed[13, :9].all()  # 2nd completion: prompt, not the 1st
    assert packed.position_ids[0, 13].item() == 9  # each completion's positions continue from the prompt
    # nothing to share: None, the caller runs the plain forward
    assert pack_prompts(ids[[0, 3, 5]], am[[0, 3, 5]], pm[[0, 3, 5]], first=4, dtype=torch.float32) is None


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompt_forward_equals_the_plain_forward(load_tiny, name, checkpointing):
    results = {}
    for share in (False, True):
        base = load_tiny()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.train()
        model = get_preft_model(base, CONFIGS[name])
        randomize_adapter(model, seed=1)
        logps = completion_logps(model, share)
        (logps.sum() / 10).backward()
        results[share] = (logps.detach(), {n: p.grad.clone() for n, p in model.adapter_named_parameters()})
    plain, shared = results[False], results[True]
    torch.testing.assert_close(shared[0], plain[0], rtol=0, atol=2e-5)
    assert plain[0].abs().sum() > 0
    for key, grad in plain[1].items():
        torch.testing.assert_close(shared[1][key], grad, rtol=1e-4, atol=1e-5)


def test_a_batch_not_laid_out_prompt_first_is_refused(load_tiny):
    model = get_preft_model(load_tiny(), CONFIGS["lora"])
    ids, am, pm, _ = rows()
    left = torch.roll(pm, shifts=2, dims=1)  # prompt tokens not at the start of the row
    with pytest.raises(ValueError, match=r"\[prompt \| completion \| padding\]"):
        model(input_ids=ids, attention_mask=am, prompt_mask=left, share_prompts=True)
