"""What every vLLM-backed engine here shares: start-up settings, prompt tokenisation, the worker RPC, and closing.

`PreftEngine`, the plain `BaseEngine` and vLLM's own multi-LoRA (`NativeLoraEngine`) all start vLLM with the
same settings (so benchmarks compare like with like) and the same worker extension (preft_rl/engine/worker.py),
which they drive through `collective_rpc`; none of them reaches into vLLM's worker from the driver.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preft_rl.adapters.config import PreftConfig
from preft_rl.models import resolve_model

from . import vllm_compat
from .worker import WORKER_EXTENSION, agreed_result

logger = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict[str, str]] | dict[str, Any]  # text, ids, chat messages, a token prompt dict
# vLLM's process groups are process-wide and a vLLM engine tears them down when it is shut down or
# garbage-collected. So a closed engine's vLLM is parked here until the last engine in the process closes.
_live_engines = 0
_parked: list[Any] = []


class VllmEngineBase:
    """A started vLLM `LLM` with preft-rl's worker extension, its tokenizer, the worker RPC and `close()`."""

    llm: Any = None

    def _start_vllm(self, model_path: str | os.PathLike, settings: dict[str, Any], vllm_kwargs: dict[str, Any],
                    multiprocess: bool = False) -> None:
        from vllm import LLM

        vllm_compat.check_vllm_version()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
        settings = {**settings, **vllm_kwargs, "worker_extension_cls": WORKER_EXTENSION}
        self.multiprocess = multiprocess
        self.llm = LLM(str(model_path), **settings)
        _track_llm()
        self.tokenizer = self.llm.get_tokenizer()
        self._rpc("preft_prepare")

    def _rpc(self, method: str, *args: Any) -> Any:
        """Call a worker-extension method on every rank; raise what it reported; return rank 0's result, after
        checking that every rank returned the same (so all ranks hold the same adapters and versions)."""
        return agreed_result(method, self.llm.collective_rpc(method, args=args))

    @property
    def _runner(self) -> Any:
        """vLLM's model runner, reachable only when vLLM runs in this process (tests and step timers use it)."""
        if self.llm is None or getattr(self, "multiprocess", False):
            return None
        try:
            return vllm_compat.model_runner(self.llm)
        except RuntimeError:  # workers in their own processes (tensor parallelism)
            return None

    def close(self) -> None:
        """Release vLLM and its memory; the engine cannot be used afterwards."""
        if self.llm is None:
            return
        try:
            self._before_close()
        except Exception as exc:  # a dead engine core (e.g. after a worker error) must still be released
            logger.warning("closing the engine: %s: %s", type(exc).__name__, exc)
        finally:
            _release_llm(self.llm)
            self.llm = None

    def _before_close(self) -> None:
        pass

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def model_settings(model_path: str, cpu_kv_cache_gib: int = 1) -> tuple[str, Any, dict[str, Any]]:
    """(resolved path, HF config, default vLLM settings) for a model id, path or offline name."""
    from transformers import AutoConfig

    path = resolve_model(model_path)
    hf_config = AutoConfig.from_pretrained(path)
    return path, hf_config, default_vllm_settings(hf_config, cpu_kv_cache_gib)


def default_vllm_settings(hf_config: Any, cpu_kv_cache_gib: int = 1) -> dict[str, Any]:
    """The vLLM settings every engine here starts from (the same for PreftEngine and the baselines, so
    benchmarks compare like with like), with a modest CPU KV cache, so users need no environment variables."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cpu_kv_cache_gib)))
    config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return dict(
        dtype=str(config_dtype).replace("torch.", "") if config_dtype else "auto",  # never a silent downcast
        enforce_eager=True,
        enable_prefix_caching=True,
        logprobs_mode="processed_logprobs",  # after temperature, as the trainer's loss needs
        seed=0,
    )


def prompt_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt given as text (special tokens added, as vllm.LLM.generate does), token ids, chat messages
    (chat template with the generation prompt), or a token prompt dict {"prompt_token_ids": [...], "sampled_spans":
    [(start, end), ...]} (a multi-turn prompt: the spans are the tokens the policy sampled in earlier turns)."""
    if isinstance(prompt, dict):
        ids = prompt.get("prompt_token_ids")
        unknown = set(prompt) - {"prompt_token_ids", "sampled_spans"}
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, (int, np.integer)) for t in ids) or unknown:
            raise ValueError(f"a prompt dict takes 'prompt_token_ids' (a list of token ids) and optionally 'sampled_spans' "
                             f"([start, end) pairs); got keys {sorted(prompt)}")
        prompt = list(ids)
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for i, message in enumerate(prompt):
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise ValueError(f"chat message {i} of a prompt is {message!r}; every message needs a string 'role' "
                                 "('system', 'user' or 'assistant') and a string 'content'")
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise ValueError(f"a prompt must be text, a list of token ids or a list of chat messages, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("got an empty prompt; every prompt needs at least one token")
    return list(ids)


def check_batch(prompts: Sequence[Any], adapters: Sequence[str | None] | None) -> list[str | None]:
    """One adapter name (or None) per prompt. A bare string is refused for either: iterating it would silently make one
    prompt (or adapter name) per character."""
    if isinstance(prompts, (str, dict)):
        raise TypeError(f"generate takes a list of prompts, got a single {type(prompts).__name__}; pass [prompt]")
    if isinstance(adapters, str):
        raise TypeError(f"adapters={adapters!r} is a single name; pass one name (or None) per prompt, e.g. "
                        f"[{adapters!r}] * len(prompts)")
    adapters = [None] * len(prompts) if adapters is None else list(adapters)
    if len(adapters) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(adapters)} adapter names; pass one name (or None) per prompt")
    return adapters


def _track_llm() -> None:
    global _live_engines
    _live_engines += 1


def _release_llm(llm: Any) -> None:
    """Park a closed engine's vLLM; shut all parked ones down once no engine in the process is live."""
    global _live_engines
    _parked.append(llm)
    _live_engines -= 1
    if _live_engines == 0:
        while _parked:
            vllm_compat.shutdown_llm(_parked.pop())
        vllm_compat.destroy_distributed_state()
    else:
        logger.info("engine closed while other engines are live: its memory is freed when the last one closes")
    gc.collect()


def adapter_source(
    source: Any, config: PreftConfig | None, load_peft_lora_as_prefill_only: bool = False
) -> tuple[dict[str, torch.Tensor], PreftConfig]:
    """(state dict, PreftConfig) from a directory (save_pretrained or PEFT), a PreftModel, or a state dict + config."""
    from preft_rl.adapters.model import PreftModel

    if isinstance(source, PreftModel):
        return source.adapter_state_dict(), source.preft_config
    if isinstance(source, (str, os.PathLike)):
        from preft_rl.adapters.serialization import WEIGHTS_NAME, read_adapter_config, read_weights

        file_config = read_adapter_config(source, load_peft_lora_as_prefill_only)
        return read_weights(Path(source) / WEIGHTS_NAME), file_config
    if isinstance(source, dict):
        if config is None:
            raise ValueError("add_adapter(name, state_dict) needs config=PreftConfig(...) (method, r, alpha, positions)")
        return source, config
    raise TypeError(f"adapter source must be a directory, a PreftModel or a state dict, got {type(source).__name__}")
