"""Small accelerate / DeepSpeed helpers the trainers share."""

from __future__ import annotations

import os
from typing import Any

import torch


def as_dataset(data: Any, name: str) -> Any:
    """A datasets.Dataset; a list of row dicts (the usual mistake) is converted, anything else is named."""
    if data is None or hasattr(data, "column_names"):
        return data
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        from datasets import Dataset

        return Dataset.from_list(data)
    raise TypeError(f"{name} must be a datasets.Dataset (or a list of row dicts such as {{'prompt': ...}}), "
                    f"got {type(data).__name__}; build one with datasets.Dataset.from_list(rows)")


def process_group_kwargs() -> list:
    """accelerate has no backend for DeepSpeed on CPU: it lets DeepSpeed start gloo but then reports one
    process whatever the world size, and DeepSpeed's batch check fails. Naming gloo fixes the count."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if deepspeed and launched and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def fill_deepspeed_batch_fields(accelerator: Any, args: Any) -> None:
    """No dataloader goes through accelerate, so DeepSpeed's "auto" batch fields are filled here."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds_config = plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    ds_config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    ds_config["train_batch_size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = args.max_grad_norm if args.max_grad_norm > 0 else 0.0
    ds_config.setdefault("zero_allow_untested_optimizer", True)


class gathered:
    """Gather ZeRO-3 shards of `params` for the block (a no-op without DeepSpeed ZeRO-3)."""

    def __init__(self, params: list[torch.nn.Parameter], accelerator: Any) -> None:
        self._ctx = None
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            import deepspeed

            self._ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def begin_memory_phase(device: torch.device) -> None:
    """Start measuring a phase's peak memory (CUDA: the allocator's peak is reset; CPU: nothing to reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_phase_gib(device: torch.device) -> float | None:
    """The phase's memory: on CUDA the allocator's peak since begin_memory_phase; on CPU the process's resident
    set at the end of the phase (Linux /proc); None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return None
