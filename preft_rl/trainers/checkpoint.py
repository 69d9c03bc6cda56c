"""Trainer checkpoints: `checkpoint-N/` with the adapter files, optimizer, scheduler, RNG, step and rollout, and
`trained_state.safetensors` with any other trained tensors (the trainer's `_checkpoint_state()`, e.g. PPO's critic).

Written to `checkpoint-N.tmp` and renamed when complete, so a crash while saving never leaves a
checkpoint that looks whole, and never written with non-finite adapter weights. Resuming restores everything
needed for the next steps to be the same as in an uninterrupted run (fp32 on CPU: bit-identical parameters).
Every file of a checkpoint is read and checked before any of it is applied: a corrupt file is named (with
the previous checkpoint to resume from instead) and leaves the trainer exactly as it was.
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

from preft_rl.adapters.serialization import KEY_PREFIX

if TYPE_CHECKING:
    from .core import PreftRLTrainer
    from .rollout import RolloutBatch

_NAME = re.compile(r"^checkpoint-(\d+)$")
EXTRA_NAME = "trained_state.safetensors"


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


def save(trainer: PreftRLTrainer, step: int, rollout: RolloutBatch | None) -> Path:
    acc, args = trainer.accelerator, trainer.args
    final = Path(args.output_dir) / f"checkpoint-{step}"
    trained = [*((KEY_PREFIX + n, p) for n, p in trainer.preft_model.adapter_named_parameters()), *trainer._checkpoint_state().items()]
    non_finite = [name for name, p in trained if not bool(torch.isfinite(p.detach()).all())]
    if non_finite:  # (ZeRO-3 shards are empty here; save_pretrained checks the gathered tensors too)
        raise ValueError(
            f"trained tensor {non_finite[0]} has non-finite values (NaN or inf) ({len(non_finite)} such tensors); "
            f"{final.name} not written. Training diverged: resume from an earlier checkpoint "
            "(resume_from_checkpoint=...) with a lower learning_rate or max_grad_norm"
        )
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
        if extra := trainer._checkpoint_state():
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / EXTRA_NAME))
    if extra_dir := trainer._checkpoint_extra_dir():  # every process takes part (the main one writes)
        trainer._save_checkpoint_extra(tmp / extra_dir)
    if acc.is_main_process:
        torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng_state_{rank}.pt")
    if rollout is not None and step % args.steps_per_generation != 0:  # mid-way through reusing a rollout
        torch.save(rollout.to_dict(), tmp / f"rollout_{rank}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "num_processes": acc.num_processes, "config": args.to_dict(), **trainer._checkpoint_json()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if args.save_total_limit:
            for old in checkpoints(args.output_dir)[: -args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load(trainer: PreftRLTrainer, path: str | Path) -> tuple[int, RolloutBatch | None]:
    """Restore a checkpoint: every file is read and checked first, then all of it is applied."""
    from .rollout import RolloutBatch

    path = Path(path)
    acc = trainer.accelerator
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json); {_previous_advice(path)}")
    state = _read(path, "trainer_state.json", lambda f: _trainer_state(json.loads(f.read_text())))
    if state["num_processes"] != acc.num_processes:
        raise ValueError(
            f"{path} was written by {state['num_processes']} process(es) but this run has {acc.num_processes}; "
            "resume with the same number of processes"
        )
    deepspeed = _uses_deepspeed(trainer)
    if deepspeed:
        if not (path / "deepspeed").is_dir():
            raise ValueError(f"{path / 'deepspeed'} is missing: the checkpoint is incomplete; {_previous_advice(path)}")
    else:
        from preft_rl.adapters.serialization import check_adapter_state, read_weights

        adapter_files = trainer._checkpoint_adapter_files()
        adapters = {name: _read(path, name, lambda f, e=expected: check_adapter_state(e, read_weights(f), str(f)))
                    for name, expected in adapter_files.items()}
        extra_expected = trainer._checkpoint_state()
        extra = _read(path, EXTRA_NAME, lambda f: check_adapter_state(extra_expected, read_weights(f), str(f))) if extra_expected else {}
        optimizer_state = _read(path, "optimizer.pt", lambda f: _optimizer_state(trainer.optimizer, torch.load(f, weights_only=False)))
    extra_dir = trainer._checkpoint_extra_dir()
    extra_state = _read(path, extra_dir, trainer._read_checkpoint_extra) if extra_dir else None
    scheduler = _read(path, "scheduler.pt", lambda f: _scheduler_state(trainer.scheduler, torch.load(f, weights_only=False)))
    rng = _read(path, f"rng_state_{acc.process_index}.pt", lambda f: _rng_state(torch.load(f, weights_only=False)))
    rollout_name = f"rollout_{acc.process_index}.pt"
    rollout = _read(path, rollout_name, lambda f: RolloutBatch(**torch.load(f, weights_only=False))) if (path / rollout_name).is_file() else None

    # Everything is readable and fits: apply it.
    if deepspeed:
        try:
            trainer.model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as exc:
            raise ValueError(f"{path / 'deepspeed'} cannot be loaded ({type(exc).__name__}: {exc}); {_previous_advice(path)}") from exc
    else:
        trainer.optimizer.load_state_dict(optimizer_state)
        with torch.no_grad():
            for name, expected in adapter_files.items():
                for key, param in expected.items():
                    param.copy_(adapters[name][key].to(device=param.device, dtype=param.dtype))
            for key, param in extra_expected.items():
                param.copy_(extra[key].to(device=param.device, dtype=param.dtype))
    if extra_dir:
        trainer._apply_checkpoint_extra(extra_state)
    trainer._checkpoint_json_loaded(state)
    trainer.scheduler.load_state_dict(scheduler)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    step = int(state["step"])
    log = Path(trainer.args.output_dir) / "log.jsonl"
    if acc.is_main_process and log.is_file():  # drop entries of steps after the checkpoint: they are redone
        kept = [line for line in log.read_text().splitlines() if _logged_step(line) <= step]
        trimmed = log.with_name("log.jsonl.tmp")
        trimmed.write_text("".join(line + "\n" for line in kept))
        trimmed.replace(log)  # a kill while trimming leaves the old log whole
    acc.wait_for_everyone()
    return step, rollout


def _logged_step(line: str) -> float:
    """The step of one log.jsonl line; a line a kill cut short (or an empty one) counts as after every checkpoint."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


def _read(path: Path, name: str, read: Any) -> Any:
    """read(path / name), with any failure reported as that file being bad, and where to resume from instead."""
    file = path / name
    try:
        return read(file)
    except Exception as exc:  # torch, pickle, json and safetensors each raise their own types
        raise ValueError(
            f"checkpoint file {file} is unreadable or corrupt ({type(exc).__name__}: {exc}); nothing of {path.name} "
            f"was loaded. {_previous_advice(path)}"
        ) from exc


def _previous_advice(path: Path) -> str:
    match = _NAME.match(path.name)
    earlier = [c for c in checkpoints(path.parent) if match and int(_NAME.match(c.name).group(1)) < int(match.group(1))]
    if earlier:
        return f"Resume from the previous checkpoint instead: resume_from_checkpoint='{earlier[-1]}' (and delete {path})"
    return f"There is no earlier checkpoint in {path.parent}: restore the file or start the run again without resuming"


def _trainer_state(state: Any) -> dict:
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("num_processes"), int):
        raise ValueError("expected a JSON object with integer 'step' and 'num_processes'")
    return state


def _optimizer_state(optimizer: Any, state: Any) -> dict:
    """The saved optimizer state, checked against `optimizer`: groups, parameter counts, shapes, finite values."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or not isinstance(state.get("param_groups"), list):
        raise ValueError("expected an optimizer state_dict with 'state' and 'param_groups'")
    current = optimizer.state_dict()["param_groups"]
    if [len(g.get("params", ())) for g in state["param_groups"]] != [len(g["params"]) for g in current]:
        raise ValueError(
            f"it holds parameter groups of sizes {[len(g.get('params', ())) for g in state['param_groups']]} but this "
            f"optimizer has {[len(g['params']) for g in current]}: saved for another adapter"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"state for parameter {index!r}, but the optimizer has {len(params)} parameters")
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(f"{key} of parameter {index} has shape {tuple(value.shape)}, expected {tuple(params[index].shape)}")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{key} of parameter {index} has non-finite values")
    return state


def _scheduler_state(scheduler: Any, state: Any) -> dict:
    if not isinstance(state, dict) or not set(scheduler.state_dict()) <= set(state):
        raise ValueError(f"expected a scheduler state_dict with keys {sorted(scheduler.state_dict())}")
    return state


def _rng_state(state: Any) -> dict:
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError("expected the RNG states 'python', 'numpy' and 'torch'")
    return state


def _uses_deepspeed(trainer: PreftRLTrainer) -> bool:
    return getattr(trainer.accelerator.state, "deepspeed_plugin", None) is not None
