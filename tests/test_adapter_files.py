"""Adapter files: round trips, the file format, and clear errors for everything that does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from preft_rl import PreftConfig, PreftModel, get_preft_model
from test_adapters import METHOD_CONFIGS, batch, make_preft, randomize_adapter


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_save_load_round_trip_gives_identical_logits(load_tiny, tokenizer, tmp_path, method, dtype):
    model = make_preft(load_tiny, method, dtype)
    randomize_adapter(model)
    ids, am, pm = batch(tokenizer, "left")
    before = model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    model.save_pretrained(tmp_path)

    loaded = PreftModel.from_pretrained(load_tiny(dtype), tmp_path)
    after = loaded(input_ids=ids, attention_mask=am, prompt_mask=pm).logits
    assert torch.equal(before, after)
    assert all(not p.requires_grad for _, p in loaded.adapter_named_parameters())
    trainable = PreftModel.from_pretrained(load_tiny(dtype), tmp_path, is_trainable=True)
    assert all(p.requires_grad for _, p in trainable.adapter_named_parameters())
    for (name, a), (_, b) in zip(model.adapter_state_dict().items(), loaded.adapter_state_dict().items()):
        assert torch.equal(a, b), name


def test_file_format_is_peft_style(load_tiny, tmp_path):
    model = make_preft(load_tiny, "lora", torch.float32)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["prefill_only"] is True and config["method"] == "lora"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == "all-linear"
    assert config["peft_type"] != "LORA"  # PEFT must not load it as an all-token LoRA
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B); lm_head is not adapted
    assert all("lora_A" in n or "lora_B" in n for n, _ in model.adapter_named_parameters())


def test_loreft_file_holds_the_materialised_orthonormal_rotation(load_tiny, tmp_path):
    model = make_preft(load_tiny, "loreft", torch.float32)
    randomize_adapter(model)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    rotation = state["base_model.model.model.layers.0.preft_reft.interventions.shared.rotate_layer.weight"]
    assert rotation.shape == (4, 128)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), atol=1e-5, rtol=0)
    # a file whose R disagrees with its free parameter is refused
    state["base_model.model.model.layers.0.preft_reft.interventions.shared.rotate_layer.weight"] = torch.eye(4, 128)
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not match the one recomputed"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)


def test_loreft_rotation_stays_orthonormal_under_adamw_weight_decay(load_tiny, tokenizer):
    model = make_preft(load_tiny, "loreft", torch.float32)
    optimizer = torch.optim.AdamW([p for _, p in model.adapter_named_parameters()], lr=0.05, weight_decay=0.1)
    ids, am, pm = batch(tokenizer, "left")
    for _ in range(5):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits.pow(2).mean().backward()
        optimizer.step()
    rotation = model.base_model.model.layers[0].preft_reft.interventions["shared"].rotate_layer.weight
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), atol=1e-5, rtol=0)


def test_mismatched_base_model_is_refused(load_tiny, tokenizer, tmp_path):
    from conftest import build_tiny_llama

    make_preft(load_tiny, "lora", torch.float32).save_pretrained(tmp_path)
    three_layers = build_tiny_llama(tokenizer, num_layers=3)
    with pytest.raises(ValueError, match="num_hidden_layers=2, but this model has num_hidden_layers=3"):
        PreftModel.from_pretrained(three_layers, tmp_path)


def test_wrong_shapes_and_missing_tensors_are_refused(load_tiny, tmp_path):
    make_preft(load_tiny, "lora", torch.float32).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(5, 128)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(5, 128\) but this model needs \(4, 128\)"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)
    del state[key]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="1 missing"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)


def test_not_an_adapter_directory(load_tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="not a prefill-only adapter"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)


def test_plain_peft_lora_needs_explicit_opt_in(load_tiny, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="load_peft_lora_as_prefill_only=True"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)
    preft = PreftModel.from_pretrained(load_tiny(), tmp_path, load_peft_lora_as_prefill_only=True)
    ids, am, _ = batch(tokenizer, "left")
    # With every real token marked as prompt, prefill-only LoRA is exactly PEFT's all-token LoRA.
    ours = preft(input_ids=ids, attention_mask=am, prompt_mask=am.bool()).logits
    theirs = peft_model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="prefix"), "unknown method 'prefix'"),
        (dict(r=0), "r=0 must be a positive integer"),
        (dict(r=-2), "r=-2 must be a positive integer"),
        (dict(alpha=0), "alpha=0 must be > 0"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(method="loreft", positions="first7"), "positions='first7' must be 'all' or 'fN\\+lM'"),
        (dict(method="loreft", layers=[1, 1]), "has duplicates"),
        (dict(target_modules=[]), "non-empty list"),
    ],
)
def test_bad_configs_name_the_value_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreftConfig(**kwargs)


def test_layer_out_of_range_and_absent_target_module(load_tiny):
    with pytest.raises(ValueError, match=r"layers \[5\] out of range: the model has 2 decoder layers"):
        get_preft_model(load_tiny(), PreftConfig(method="direft", layers=[0, 5]))
    with pytest.raises(ValueError, match=r"target_modules \['qkv_proj'\] match no linear layer.*'q_proj'"):
        get_preft_model(load_tiny(), PreftConfig(method="lora", target_modules=["q_proj", "qkv_proj"]))


def test_target_modules_list_adapts_only_those(load_tiny):
    model = get_preft_model(load_tiny(), PreftConfig(method="lora", target_modules=["q_proj", "down_proj"]))
    adapted = {n.split(".")[-3] for n, _ in model.adapter_named_parameters()}
    assert adapted == {"q_proj", "down_proj"}


def test_unsupported_model_family_is_refused(tiny_llama_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama"):
        get_preft_model(gpt2, PreftConfig())


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_supported_families_keep_the_no_op_start(model_type, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    plain = AutoModelForCausalLM.from_config(config).eval()
    plain.load_state_dict(base.state_dict())
    ids, am, pm = batch(tokenizer, "left")
    expected = plain(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    for method in METHOD_CONFIGS:
        copy = AutoModelForCausalLM.from_config(config).eval()
        copy.load_state_dict(base.state_dict())
        model = get_preft_model(copy, PreftConfig(**METHOD_CONFIGS[method]))
        assert torch.equal(model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, expected)
        randomize_adapter(model)
        assert not torch.equal(model(input_ids=ids, attention_mask=am, prompt_mask=pm).logits, expected)
