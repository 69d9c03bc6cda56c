"""An adapter method is one object: a new one, defined here and registered without touching the library, runs through
get_preft_model, save/load, 2 GRPO steps and PreftEngine, and the engine's greedy tokens equal PreftModel.generate's.

The toy method is a prompt-only per-channel scale after chosen decoder layers, `h * (1 + s)` with s (hidden,) per
layer, starting at s = 0 (an exact no-op that still receives gradients).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from preft_rl import PreftConfig, PreftModel, get_preft_model
from preft_rl.adapters import keys
from preft_rl.adapters.methods import AdapterMethod, BuiltModule, attach_after_layer, method_names, register_method, unregister_method

from conftest import ENGINE_ARGS
from test_grpo_trainer import assert_engine_serves, config, dataset, first_token_even

ROOT = Path(__file__).resolve().parents[1]


class ScaleLayer(nn.Module):
    """`h * (1 + s)` at the selected prompt tokens of one decoder layer's output."""

    def __init__(self, hidden: int, slot, device: torch.device) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(hidden, device=device))
        self._slot = slot

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        selection = self._slot.current
        if selection is None:
            return hidden
        flat = hidden.reshape(-1, hidden.shape[-1])  # (B * T, d)
        rows = selection.rows("prompt")
        scaled = flat[rows].to(torch.float32) * (1 + self.scale)
        return flat.index_put((rows,), scaled.to(flat.dtype)).reshape(hidden.shape)

    def is_identity(self) -> bool:
        return not self.scale.any()


class ScaleMethod(AdapterMethod):
    name = "toyscale"
    fields = frozenset({"layers"})
    site = "residual"
    param_markers = (".preft_scale.",)
    engine_slot_dim = 1

    def build(self, base_model, layers, layers_name, config, slot, generator):
        indices = range(len(layers)) if config.layers == "all" else config.layers
        device = next(base_model.parameters()).device
        built = []
        for i in indices:
            module = ScaleLayer(base_model.config.hidden_size, slot, device)
            built.append(BuiltModule(f"{i}.preft_scale", module, lambda layer=layers[i], m=module: attach_after_layer(layer, "preft_scale", m)))
        return built

    def engine_tensor_shapes(self, shape, max_rank, capacity, extended):
        return {"scale": (shape.num_layers, capacity, shape.hidden)}

    def engine_expected_keys(self, config, shape):
        layers = range(shape.num_layers) if config.layers == "all" else config.layers
        return frozenset(keys.layer_key(i, "preft_scale.scale") for i in layers)

    def engine_stage(self, name, state, config, shape, check):
        staged = {}
        for key, tensor in state.items():
            where = keys.split_layer_key(key)
            if where is None or where[1] != "preft_scale.scale" or where[0] >= shape.num_layers:
                raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} for a {self.name} adapter")
            staged[str(where[0])] = check(key, tensor, (shape.hidden,))
        return staged, frozenset(state)

    def engine_write(self, tensors, slot, staged, config, shape, max_rank):
        acts = np.zeros(shape.num_layers, dtype=bool)
        for layer, value in staged.items():
            tensors["scale"][int(layer), slot].copy_(value)
            acts[int(layer)] = True
        return acts

    def engine_apply_residual(self, residual, tensors, layer, passes):
        for _, metadata in passes:
            rows = metadata.sorted_token_indices.long()  # (P,) grouped by slot
            slots = torch.repeat_interleave(torch.as_tensor(metadata.active_ids_host), torch.as_tensor(metadata.counts_host))
            scale = tensors["scale"][layer][slots.to(residual.device)].to(torch.float32)  # (P, d)
            residual.index_put_((rows,), (residual[rows].to(torch.float32) * (1 + scale)).to(residual.dtype))

    def plan_adapter_params(self, shape, rank):
        return shape.layers * shape.hidden

    def plan_slot_elems(self, shape, rank, tp):
        return shape.layers * shape.hidden


@pytest.fixture
def toy_method():
    register_method(ScaleMethod())
    yield "toyscale"
    unregister_method("toyscale")


def randomize(model: PreftModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.adapter_named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def test_a_registered_method_runs_everywhere_without_a_library_change(toy_method, load_tiny, tokenizer, tiny_llama_dir, tmp_path):
    from preft_rl import PreftEngine, PreftGRPOTrainer
    from preft_rl.engine import SamplingParams

    assert toy_method in method_names()
    cfg = PreftConfig(method=toy_method, layers=[0, 1])
    with pytest.raises(ValueError, match=r"positions='f2\+l2' do not apply to method='toyscale'"):
        PreftConfig(method=toy_method, positions="f2+l2")

    # get_preft_model: an exact no-op at start, a real change once trained, only at prompt tokens
    model = get_preft_model(load_tiny(), cfg)
    assert model.is_identity()
    ids = torch.tensor([tokenizer("three red pears and a fig")["input_ids"]])
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[:, :4] = True
    with model.disable_adapter():
        base_logits = model(input_ids=ids, prompt_mask=prompt_mask).logits
    assert torch.equal(model(input_ids=ids, prompt_mask=prompt_mask).logits, base_logits)
    randomize(model)
    assert not model.is_identity()
    logits = model(input_ids=ids, prompt_mask=prompt_mask).logits
    assert (logits - base_logits).abs().max() > 1e-2
    assert sorted(model.adapter_state_dict()) == [keys.layer_key(i, "preft_scale.scale") for i in (0, 1)]

    # save / load: the same tensors and the same logits
    model.save_pretrained(tmp_path / "toy")
    loaded = PreftModel.from_pretrained(load_tiny(), tmp_path / "toy")
    assert loaded.preft_config.method == toy_method and loaded.preft_config.layers == [0, 1]
    assert torch.equal(loaded(input_ids=ids, prompt_mask=prompt_mask).logits, logits)

    # PreftEngine (torch path on CPU): greedy tokens equal PreftModel.generate, beside a request with no adapter
    engine = PreftEngine(str(tiny_llama_dir), max_adapters=4, max_rank=8, method=toy_method, **ENGINE_ARGS)
    try:
        engine.add_adapter("toy", tmp_path / "toy")
        prompts = [tokenizer(text)["input_ids"] for text in ("three red pears and a fig", "a fig", "seven green apples")]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        outs = engine.generate(prompts + prompts[:1], params, adapters=["toy", "toy", "toy", None])
        for prompt, out in zip(prompts, outs):
            reference = loaded.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
            assert list(out.outputs[0].token_ids) == reference.tolist()
        with loaded.disable_adapter():
            plain = loaded.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False)[0, len(prompts[0]):]
        assert list(outs[3].outputs[0].token_ids) == plain.tolist()
        assert outs[0].outputs[0].token_ids != outs[3].outputs[0].token_ids  # the adapter changed what was generated
    finally:
        engine.close()

    # the trainer: 2 GRPO steps update the toy adapter, and its engine serves exactly the trained adapter
    trainer = PreftGRPOTrainer(model=str(tiny_llama_dir), reward_funcs=[first_token_even], train_dataset=dataset(chat=False),
                               args=config(tmp_path / "train", max_steps=2, learning_rate=0.2), preft_config=cfg)
    try:
        trainer.train()
        assert not trainer.preft_model.is_identity()
        assert trainer.step == 2
        assert_engine_serves(trainer, trainer.preft_model, dataset(chat=False, n=3)["prompt"])
    finally:
        trainer.close()


LIBRARY = [ROOT / "preft_rl", ROOT / "kernels", ROOT / "rewards", ROOT / "examples"]
# A comparison with a method name, or a test of `config.method` against a literal.
NAME_COMPARISON = re.compile(
    r"""method\s*(==|!=)\s*["']|["'](lora|loreft|direft)["']\s*(==|!=)|method\s+(not\s+)?in\s*[(\[{]\s*["']|\bis_lora\b"""
    r"""|(==|!=)\s*["'](lora|loreft|direft)["']"""
)


def test_no_library_file_compares_a_method_name_outside_the_registry():
    offenders = []
    for root in LIBRARY:
        for path in root.rglob("*.py"):
            if "adapters/methods" in path.as_posix():
                continue  # the registry: each method names itself there
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if NAME_COMPARISON.search(line) and not re.search(r"""\.op\s*==|\["op"\]\s*==""", line):  # kernel-op labels
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "method names compared outside preft_rl/adapters/methods (ask get_method instead):\n" + "\n".join(offenders)
    assert NAME_COMPARISON.search('if cfg.method == "loreft":') and NAME_COMPARISON.search('if method in ("lora", "x"):')


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(method="lora", layers=[0], positions="f2+l2"), "layers=[0], positions='f2+l2'"),
        (dict(method="loreft", target_modules=["q_proj"]), "target_modules=['q_proj']"),
        (dict(method="loreft", alpha=16), "alpha=16"),
        (dict(method="loreft", init_scale=0.1), "init_scale=0.1"),
        (dict(method="direft", target_modules=["q_proj"]), "target_modules=['q_proj']"),
    ],
)
def test_fields_of_another_method_are_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named) + r" do not apply to method="):
        PreftConfig(**kwargs)


def test_old_adapter_files_with_every_field_written_still_load(load_tiny, tmp_path):
    """Files written before the method specs carried every field (e.g. lora_alpha for a LoReFT); the reader keeps the
    fields the method reads."""
    import json

    model = get_preft_model(load_tiny(), PreftConfig(method="loreft", r=4, layers=[1], positions="f2+l2"))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw.update(lora_alpha=8.0, target_modules="all-linear", init_scale=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    loaded = PreftModel.from_pretrained(load_tiny(), tmp_path)
    assert loaded.preft_config.alpha is None and loaded.preft_config.positions == "f2+l2"
