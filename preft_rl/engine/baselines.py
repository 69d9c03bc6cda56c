"""The all-token baseline users pick today: vLLM's native multi-LoRA (`enable_lora`, `LoRARequest`).

`NativeLoraEngine` has PreftEngine's registry/generate shape so one benchmark drives both. Its adapters
act on every token (prompt and generated), as an ordinary LoRA does. It takes the same adapter sources
as PreftEngine and writes each as a PEFT LoRA directory, which is what vLLM loads.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from preft_rl.adapters.config import PreftConfig
from preft_rl.adapters.methods.lora import LoraMethod

from .common import Prompt, VllmEngineBase, adapter_source, check_batch, model_settings, prompt_token_ids

_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class BaseEngine(VllmEngineBase):
    """The base model in plain vLLM (no adapter code at all), with PreftEngine's generate shape."""

    def __init__(self, model_path: str | os.PathLike, **vllm_kwargs: Any) -> None:
        self.model_path, _, settings = model_settings(model_path)
        self._start_vllm(self.model_path, settings, vllm_kwargs)

    def generate(self, prompts: Sequence[Prompt], sampling_params: Any = None, adapters: Sequence[str | None] | None = None,
                 use_tqdm: bool = True) -> list[Any]:
        if adapters is not None and any(a is not None for a in adapters):
            raise ValueError("BaseEngine serves the base model only; pass adapters=None")
        requests = [{"prompt_token_ids": prompt_token_ids(self.tokenizer, p)} for p in prompts]
        return self.llm.generate(requests, sampling_params, use_tqdm=use_tqdm)


class NativeLoraEngine(VllmEngineBase):
    """vLLM's own multi-LoRA (`enable_lora`): every adapter acts at every token."""

    def __init__(self, model_path: str | os.PathLike, max_adapters: int = 64, max_rank: int = 16, **vllm_kwargs: Any) -> None:
        vllm_rank = next((r for r in _VLLM_RANKS if r >= max_rank), None)
        if vllm_rank is None:
            raise ValueError(f"max_rank={max_rank} exceeds vLLM's largest LoRA rank {_VLLM_RANKS[-1]}")
        self.model_path, _, settings = model_settings(model_path)
        settings.update(enable_lora=True, max_loras=max_adapters, max_cpu_loras=max_adapters, max_lora_rank=vllm_rank)
        self._start_vllm(self.model_path, settings, vllm_kwargs)
        self._dir = tempfile.TemporaryDirectory(prefix="preft-native-lora-")
        self._requests: dict[str, Any] = {}
        self.max_rank = max_rank

    def add_adapter(self, name: str, source: Any, config: PreftConfig | None = None) -> None:
        """Register a LoRA from a directory (preft-rl's files or a plain PEFT LoRA directory: this engine serves every
        adapter at every token, as PEFT does, so no opt-in is needed), a PreftModel, or a state dict + config."""
        from vllm.lora.request import LoRARequest

        state, config = adapter_source(source, config, load_peft_lora_as_prefill_only=True)
        if not isinstance(config.method_spec, LoraMethod):  # vLLM's own LoRA computes exactly that method
            raise ValueError(f"vLLM's native LoRA serves LoRA adapters only, not {config.method!r}")
        if config.r > self.max_rank:
            raise ValueError(f"adapter {name!r} has rank {config.r} but the engine was started with max_rank={self.max_rank}")
        if name in self._requests:
            raise ValueError(f"adapter {name!r} is already registered")
        path = Path(self._dir.name) / f"{len(self._requests)}"
        write_peft_lora(state, config, path)
        self._requests[name] = LoRARequest(name, len(self._requests) + 1, str(path))

    @property
    def adapters(self) -> list[str]:
        return list(self._requests)

    def generate(
        self, prompts: Sequence[Prompt], sampling_params: Any = None, adapters: Sequence[str | None] | None = None, use_tqdm: bool = True
    ) -> list[Any]:
        adapters = check_batch(prompts, adapters)
        unknown = sorted({a for a in adapters if a is not None and a not in self._requests})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; add_adapter first")
        requests = [{"prompt_token_ids": prompt_token_ids(self.tokenizer, p)} for p in prompts]
        lora_requests = [self._requests[a] if a is not None else None for a in adapters]
        return self.llm.generate(requests, sampling_params, lora_request=lora_requests, use_tqdm=use_tqdm)

    def _before_close(self) -> None:
        self._dir.cleanup()


def write_peft_lora(state: dict[str, torch.Tensor], config: PreftConfig, path: str | os.PathLike) -> Path:
    """A LoRA in the file format (preft-rl's keys are PEFT's) written as a plain PEFT LoRA directory, which vLLM's
    native LoRA (`enable_lora`, `vllm serve --lora-modules`) loads. Returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    targets = sorted({key.split(".")[-3] for key in state})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": 0.0, "bias": "none", "target_modules": targets if targets != sorted(_ALL_LINEAR) else _ALL_LINEAR,
    }
    (path / "adapter_config.json").write_text(json.dumps(peft_config))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"))
    return path
