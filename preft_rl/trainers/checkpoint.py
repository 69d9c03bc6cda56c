"""Trainer checkpoints: `checkpoint-N/` with the adapter files, optimizer, scheduler, RNG, step and rollout.

Written to `checkpoint-N.tmp` and renamed when complete, so a crash while saving never leaves a
checkpoint that looks whole. Resuming restores everything needed for the next steps to be the same as
in an uninterrupted run (fp32 on CPU: bit-identical parameters).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

if TYPE_CHECKING:
    from .grpo_trainer import PreftGRPOTrainer
    from .rollout import RolloutBatch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def save(trainer: PreftGRPOTrainer, step: int, rollout: RolloutBatch | None) -> Path:
    acc, args = trainer.accelerator, trainer.args
    final = Path(args.output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    trainer.save_model(tmp)
    rank = acc.process_index
    if _uses_deepspeed(trainer):  # sharded optimizer state: every rank writes its part (adapter only)
        trainer.model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif acc.is_main_process:
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
    if acc.is_main_process:
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng_state_{rank}.pt")
    if rollout is not None and step % args.num_iterations != 0:  # mid-way through reusing a rollout
        torch.save(rollout.to_dict(), tmp / f"rollout_{rank}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "num_processes": acc.num_processes, "config": args.to_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if args.save_total_limit:
            for old in checkpoints(args.output_dir)[: -args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load(trainer: PreftGRPOTrainer, path: str | Path) -> tuple[int, RolloutBatch | None]:
    from .rollout import RolloutBatch

    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    state: dict[str, Any] = json.loads(state_file.read_text())
    acc = trainer.accelerator
    if state["num_processes"] != acc.num_processes:
        raise ValueError(
            f"{path} was written by {state['num_processes']} process(es) but this run has {acc.num_processes}; "
            "resume with the same number of processes"
        )
    if _uses_deepspeed(trainer):
        trainer.model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                      load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        trainer.preft_model.load_adapter_state_dict(load_file(str(path / "adapter_model.safetensors")))
        trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / f"rng_state_{acc.process_index}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    rollout_file = path / f"rollout_{acc.process_index}.pt"
    rollout = RolloutBatch(**torch.load(rollout_file, weights_only=False)) if rollout_file.is_file() else None
    step = int(state["step"])
    log = Path(trainer.args.output_dir) / "log.jsonl"
    if acc.is_main_process and log.is_file():  # drop entries of steps after the checkpoint: they are redone
        kept = [line for line in log.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        log.write_text("".join(line + "\n" for line in kept))
    acc.wait_for_everyone()
    return step, rollout


def _uses_deepspeed(trainer: PreftGRPOTrainer) -> bool:
    return getattr(trainer.accelerator.state, "deepspeed_plugin", None) is not None
