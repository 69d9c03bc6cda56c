"""Adapter probes from the reliability sweep (issue 14): configs refuse non-finite numbers, a failed load
leaves the caller's model as it was, and no adapter file is ever written with non-finite weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from preft_rl import PreftConfig, PreftModel, get_preft_model
from test_adapters import METHOD_CONFIGS, batch, make_preft, randomize_adapter


@pytest.mark.parametrize(
    "kwargs",
    [dict(alpha=math.inf), dict(alpha=-math.inf), dict(alpha=math.nan), dict(init_scale=math.inf), dict(init_scale=math.nan),
     dict(method="direft", init_scale=math.inf)],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_config_refuses_non_finite_numbers(kwargs):
    field, value = [(k, v) for k, v in kwargs.items() if k != "method"][0]
    with pytest.raises(ValueError, match=rf"PreftConfig: {field}={value} must be .*finite"):
        PreftConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(alpha="16"), r"alpha='16' must be a number"), (dict(init_scale=True), "init_scale=True must be a number"),
     (dict(dropout=math.nan), r"dropout=nan must be in \[0, 1\)"), (dict(seed=1.5), "seed=1.5 must be an integer")],
)
def test_config_refuses_numbers_of_the_wrong_type(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreftConfig(**kwargs)


def model_fingerprint(model: torch.nn.Module) -> tuple:
    """Everything a failed load could change on the caller's model: modules, hooks, parameters, flags."""
    modules = tuple((name, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules())
    params = tuple((name, p.requires_grad, p.detach().clone()) for name, p in model.named_parameters())
    return modules, params


def assert_same_model(before: tuple, after: tuple) -> None:
    assert before[0] == after[0]
    assert [(n, g) for n, g, _ in before[1]] == [(n, g) for n, g, _ in after[1]]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(before[1], after[1]))


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "method,changes,message",
    [
        ("lora", dict(r=8), r"has shape \(4, 128\) but this model needs \(8, 128\)"),
        ("lora", dict(target_modules=["q_proj"]), r"unexpected"),
        ("loreft", dict(layers=[0]), r"unexpected"),
        ("loreft", dict(share_first_last=False), r"missing"),
        ("direft", dict(r=200), r"shape"),
    ],
)
def test_a_failed_load_leaves_the_base_model_untouched_and_a_retry_works(load_tiny, tokenizer, tmp_path, method, changes, message):
    trained = make_preft(load_tiny, method, torch.float32)
    randomize_adapter(trained)
    ids, am, pm = batch(tokenizer, "left")
    expected = trained(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    good, bad = tmp_path / "good", tmp_path / "bad"
    trained.save_pretrained(good)
    trained.save_pretrained(bad)
    edit_config(bad, **changes)

    base = load_tiny()
    before = model_fingerprint(base)
    with pytest.raises(ValueError, match=message):
        PreftModel.from_pretrained(base, bad)
    assert_same_model(before, model_fingerprint(base))
    loaded = PreftModel.from_pretrained(base, good)  # the same base, after the failure
    assert torch.equal(loaded(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, expected)


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_a_file_with_non_finite_weights_is_refused_before_the_model_changes(load_tiny, tmp_path, method):
    model = make_preft(load_tiny, method, torch.float32)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(str(path))
    key = sorted(k for k in state if not k.endswith("rotate_layer.weight"))[1]
    state[key][0] = math.nan
    save_file(state, str(path))
    base = load_tiny()
    before = model_fingerprint(base)
    with pytest.raises(ValueError, match=rf"{key} .*non-finite.*adapter_model.safetensors"):
        PreftModel.from_pretrained(base, tmp_path)
    assert_same_model(before, model_fingerprint(base))


def test_a_truncated_weights_file_is_named_and_changes_nothing(load_tiny, tmp_path):
    make_preft(load_tiny, "lora", torch.float32).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    base = load_tiny()
    before = model_fingerprint(base)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors.*cannot be read"):
        PreftModel.from_pretrained(base, tmp_path)
    assert_same_model(before, model_fingerprint(base))


def test_load_adapter_state_dict_refuses_non_finite_values_and_keeps_the_old_ones(load_tiny):
    model = make_preft(load_tiny, "lora", torch.float32)
    randomize_adapter(model)
    kept = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    state = {k: v.clone() for k, v in kept.items()}
    key = sorted(state)[-1]
    state[key][0, 0] = math.inf
    with pytest.raises(ValueError, match=f"{key} has non-finite values"):
        model.load_adapter_state_dict(state)
    assert all(torch.equal(kept[k], v) for k, v in model.adapter_state_dict().items())


def test_integer_or_numpy_adapter_tensors_are_named_and_change_nothing(load_tiny):
    """An int64 tensor (e.g. a rounded export) would be copied in silently rounded; a numpy array has no torch dtype."""
    model = make_preft(load_tiny, "lora", torch.float32)
    randomize_adapter(model)
    kept = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    key = sorted(kept)[0]
    with pytest.raises(TypeError, match=rf"{key} in the given state dict has dtype torch.int64; adapter weights are floating point"):
        model.load_adapter_state_dict({**kept, key: kept[key].round().long()})
    with pytest.raises(TypeError, match=rf"{key} in the given state dict is a ndarray; pass torch tensors"):
        model.load_adapter_state_dict({**kept, key: kept[key].numpy()})
    assert all(torch.equal(kept[k], v) for k, v in model.adapter_state_dict().items())


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_save_pretrained_refuses_non_finite_weights_and_keeps_the_previous_files(load_tiny, tmp_path, bad_value):
    model = make_preft(load_tiny, "direft", torch.float32)
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    name, param = next(iter(model.adapter_named_parameters()))
    with torch.no_grad():
        param.view(-1)[3] = bad_value
    with pytest.raises(ValueError, match=rf"base_model.model.{name} has non-finite values.*not written"):
        model.save_pretrained(tmp_path)
    after = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(after) == set(saved) and all(torch.equal(after[k], saved[k]) for k in saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(ValueError, match="non-finite"):
        model.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "adapter_model.safetensors").exists()


def test_get_preft_model_after_a_refused_config_still_works(load_tiny):
    base = load_tiny()
    before = model_fingerprint(base)
    with pytest.raises(ValueError):
        get_preft_model(base, PreftConfig(method="lora", target_modules=["q_proj", "nope"]))
    assert_same_model(before, model_fingerprint(base))
    assert get_preft_model(base, PreftConfig(method="lora")) is not None


def test_a_corrupt_adapter_config_names_the_file(load_tiny, tmp_path):
    model = get_preft_model(load_tiny(), PreftConfig(method="lora", r=4, seed=0))
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFT", "r": 4,')  # truncated
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON .* save the adapter again"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)
