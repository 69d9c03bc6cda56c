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

    # the fix the error gives works for both entry points (the engine's add_adapter passes it through)
    with pytest.raises(ValueError, match=r"load_peft_lora_as_prefill_only=True to PreftModel.from_pretrained or PreftEngine.add_adapter"):
        PreftModel.from_pretrained(load_tiny(), tmp_path)
    preft = PreftModel.from_pretrained(load_tiny(), tmp_path, load_peft_lora_as_prefill_only=True)
    ids, am, _ = batch(tokenizer, "left")
    # With every real token marked as prompt, prefill-only LoRA is exactly PEFT's all-token LoRA.
    ours = preft(input_ids=ids, attention_mask=am, prompt_mask=am.bool()).logits
    theirs = peft_model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# The forms of LoraConfig.target_modules PEFT users write, and what PEFT 0.21 stores for each in
# adapter_config.json: "all-linear" becomes a list of full module paths ('model.layers.0.mlp.down_proj'),
# a list of short names stays one, a str other than "all-linear" is a regex fullmatched against full paths.
PEFT_TARGETS = {
    "all-linear": dict(target_modules="all-linear"),
    "short-names": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(q_proj|down_proj)"),
    "regex-one-layer": dict(target_modules=r"model\.layers\.1\.self_attn\.[ko]_proj"),
    "all-linear-exclude": dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"]),
}


def _save_peft_lora(load_tiny, directory, **lora_kwargs):
    """A LoRA written by PEFT's own save_pretrained, with non-zero B (so it changes the logits)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(load_tiny(), LoraConfig(r=4, lora_alpha=8, **lora_kwargs))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(directory)
    targeted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    return peft_model.eval(), targeted


@pytest.mark.parametrize("form", list(PEFT_TARGETS))
def test_peft_lora_folders_load_as_prefill_only_on_exactly_peft_targets(load_tiny, tokenizer, tmp_path, form):
    from preft_rl.adapters.layers import PreftLoraLinear
    from preft_rl.adapters.serialization import read_adapter_config
    from test_adapters import COMPLETIONS, PROMPTS

    peft_model, targeted = _save_peft_lora(load_tiny, tmp_path, **PEFT_TARGETS[form])
    assert 0 < len(targeted) < 2 * 7 or form == "all-linear"  # a subset, so targeting too much is seen
    preft = PreftModel.from_pretrained(load_tiny(), tmp_path, load_peft_lora_as_prefill_only=True)
    ours_targeted = {n for n, m in preft.base_model.named_modules() if isinstance(m, PreftLoraLinear)}
    assert ours_targeted == targeted  # no more, no fewer
    # without a base model (what PreftEngine.add_adapter reads), the config names the same modules
    engine_config = read_adapter_config(tmp_path, load_peft_lora_as_prefill_only=True)
    assert (engine_config.r, engine_config.alpha) == (4, 8)
    from_engine_config = PreftModel(load_tiny(), engine_config).base_model.named_modules()
    assert {n for n, m in from_engine_config if isinstance(m, PreftLoraLinear)} == targeted

    base = load_tiny()
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        p, c = tokenizer(prompt).input_ids, tokenizer(completion).input_ids
        ids = torch.tensor([p + c])
        prompt_mask = torch.tensor([[True] * len(p) + [False] * len(c)])
        ours = preft(input_ids=ids, prompt_mask=prompt_mask).logits[0]
        with torch.no_grad():
            # reference: PEFT's all-token LoRA over the prompt, then the base model over the completion,
            # attending to the adapted prompt's KV cache (what prefill-only means)
            out = peft_model(input_ids=torch.tensor([p]), use_cache=True)
            with peft_model.disable_adapter():
                rest = peft_model(input_ids=torch.tensor([c]), past_key_values=out.past_key_values).logits[0]
            plain = base(input_ids=torch.tensor([p])).logits[0]
        torch.testing.assert_close(ours[: len(p)], out.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[len(p):], rest, atol=1e-5, rtol=1e-5)
        assert (out.logits[0] - plain).abs().max() > 1e-2  # the LoRA really acts: the comparison can fail


@pytest.mark.parametrize(
    "lora_kwargs,message",
    [
        (dict(target_modules=["q_proj"], use_dora=True), "use_dora"),
        (dict(target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform"),
        (dict(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
        (dict(target_modules=["q_proj", "lm_head"]), r"\['lm_head'\] match no linear layer inside the decoder layers"),
    ],
)
def test_unsupported_peft_lora_options_are_refused_by_name(load_tiny, tmp_path, lora_kwargs, message):
    _save_peft_lora(load_tiny, tmp_path, **lora_kwargs)
    base = load_tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        PreftModel.from_pretrained(base, tmp_path, load_peft_lora_as_prefill_only=True)
    assert base.state_dict().keys() == before.keys() and all(torch.equal(before[k], v) for k, v in base.state_dict().items())


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


def test_key_format_docstring_examples_run():
    import doctest

    import preft_rl.adapters.keys as keys

    result = doctest.testmod(keys)
    assert result.attempted > 0 and result.failed == 0, result
