"""docs/design/trainer.md's example, run as written: a new loss is registered and trained with, no subclass."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from preft_rl.trainers import losses
from test_grpo_trainer import dataset, first_token_even

pytest.importorskip("vllm")

DOC = Path(__file__).resolve().parents[1] / "docs" / "design" / "trainer.md"


def doc_example() -> str:
    """The python block right after the doc's `<!-- tested: tests/test_trainer_registry.py -->` marker."""
    match = re.search(r"<!-- tested: tests/test_trainer_registry.py -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC} lost its tested example block"
    return match.group(1)


def test_the_documented_new_loss_trains_without_a_subclass(tiny_llama_dir, tmp_path, monkeypatch):
    code = doc_example()
    assert len(code.strip().splitlines()) <= 15 and "class " not in code  # short, and no subclass
    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))  # the example's registration stays in this test
    used = []
    get_loss = losses.get_loss
    monkeypatch.setattr(losses, "get_loss", lambda name: (used.append(name), get_loss(name))[1])
    adapters = []
    from preft_rl import PreftGRPOTrainer

    train = PreftGRPOTrainer.train
    monkeypatch.setattr(PreftGRPOTrainer, "train", lambda self: (adapters.append(self), train(self))[1])
    namespace = dict(model=str(tiny_llama_dir), reward=first_token_even, train_dataset=dataset(False, n=8),
                     output_dir=str(tmp_path))
    try:
        exec(compile(code, str(DOC), "exec"), namespace)
    finally:
        for trainer in adapters:
            trainer.close()
    assert "unclipped" in losses.LOSSES and losses.LOSSES["unclipped"] is namespace["unclipped_loss"]
    assert used == ["unclipped"] * 2  # 2 steps of one micro-batch each, every one through the registered loss
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(row["clip_ratio"] == 0.0 for row in log)
    trained = adapters[0].preft_model.adapter_state_dict()
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # lora_B starts at 0: it moved
    assert all(torch.isfinite(v).all() for v in trained.values())
