"""Small accelerate / DeepSpeed helpers the trainers share."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def deepspeed_zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage accelerate runs (None without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


def register_zero3_adapter_parameters(module: torch.nn.Module) -> int:
    """Tell DeepSpeed ZeRO-3 which adapter parameters each adapter module inside `module` reads; returns how many.
    Call it before DeepSpeed wraps `module`.

    ZeRO-3 gathers a module's own parameters around its forward and backward. An adapter module reads its
    sub-modules' weights directly (the LoRA A and B matrices, a ReFT rotation) and hands them to one fused op, so
    those sub-modules never run and their shards would be read as empty tensors. Registering them as the adapter
    module's external parameters makes DeepSpeed gather them with it.
    """
    import deepspeed

    count = 0
    for sub in module.modules():  # PreftModel and TenantPreftModel
        if callable(getattr(sub, "adapter_modules_with_parameters", None)):
            for adapter, params in sub.adapter_modules_with_parameters():
                for param in params:
                    deepspeed.zero.register_external_parameter(adapter, param)
                    count += 1
    return count


class gathered:
    """Gather ZeRO-3 shards of `params` for the block (a no-op without DeepSpeed ZeRO-3)."""

    def __init__(self, params: list[torch.nn.Parameter], accelerator: Any) -> None:
        self._ctx = None
        if deepspeed_zero_stage(accelerator) == 3:
            import deepspeed

            self._ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def begin_memory_phase(device: torch.device) -> None:
    """Start measuring a phase's peak memory. CUDA: the allocator's peak is reset. CPU (Linux): the process's peak
    resident set (VmHWM) is reset to the current resident set (writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: memory_phase_gib then gives the peak since the process started


def memory_phase_gib(device: torch.device) -> float | None:
    """The phase's peak memory since begin_memory_phase: on CUDA the allocator's peak; on CPU the process's peak
    resident set (Linux /proc, colocated vLLM included); None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def peak_rss_gib() -> float | None:
    """This process's peak resident set (Linux VmHWM: since it started, or since the last begin_memory_phase on
    CPU), in GiB; None where /proc cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


class PhaseRecorder:
    """Wall time and peak memory of named, non-overlapping phases of a step (sums of time and maxima of memory
    over repeated phases, such as the forward of each micro-batch). `phase` blocks must not nest: each one resets
    the memory peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_gib: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin_memory_phase(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            peak = memory_phase_gib(self.device)
            if peak is not None:
                self.peak_gib[name] = max(self.peak_gib.get(name, 0.0), peak)
