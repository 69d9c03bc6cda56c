"""PreftEngine: one in-process vLLM serving many prefill-only adapters per batch.

The base weights are loaded once and never change; adapters are registered by name and applied only
at their own requests' prompt tokens. Prefix caching stays on: each adapted prompt carries a cache salt
of (adapter, version, prompt length), so cached prompt KV is never shared across adapters or versions
(a name's versions never repeat, not even across remove_adapter and a new add_adapter of that name),
and KV computed for generated tokens (plain) is never reused as prompt KV (adapted) when a later prompt
extends an earlier conversation: the longer prompt has another length, so another salt.

Compilation: by default the engine runs vLLM eagerly (`enforce_eager=True`: no torch.compile, no CUDA
graphs), which starts in seconds. With `enforce_eager=False` vLLM compiles the model: the adapters are
registered custom ops (`preft_rl::apply_lora`, `preft_rl::apply_reft`) added to vLLM's splitting ops,
so they stay opaque to torch.compile and run eagerly between piecewise graphs, reading each step's
token selection when they run.
"""

from __future__ import annotations

import copy
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
from .model import EXTRA_ARGS_KEY, SPLITTING_OPS, NonFiniteActivations, PreftRuntime, preft_model_class, register_runtime
from .registry import AdapterEntry, AdapterRegistry, ModelShape

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
Prompt = str | list[int] | list[dict[str, str]]
# vLLM's process groups are process-wide and a vLLM engine tears them down when it is shut down or
# garbage-collected. So a closed engine's vLLM is parked here until the last engine in the process closes.
_live_engines = 0
_parked: list[Any] = []


class PreftEngine:
    """Colocated vLLM with multi-adapter, prefill-only adapter application.

    >>> engine = PreftEngine("smollm2-135m-instruct", max_adapters=64, max_rank=16)   # doctest: +SKIP
    >>> engine.add_adapter("user-7", "path/to/adapter")                                 # doctest: +SKIP
    >>> outs = engine.generate(["2+2="], SamplingParams(max_tokens=8), adapters=["user-7"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        max_adapters: int = 64,
        max_rank: int = 64,
        method: str = "lora",
        *,
        adapter_scope: str = "prompt",
        cpu_kv_cache_gib: int = 1,
        **vllm_kwargs: Any,
    ) -> None:
        vllm_compat.check_vllm_version()
        if adapter_scope not in ("prompt", "all"):
            raise ValueError(f"adapter_scope={adapter_scope!r}: use 'prompt' (PreFT) or 'all' (an all-token baseline)")
        if vllm_kwargs.get("tensor_parallel_size", 1) != 1:
            raise ValueError("PreftEngine runs vLLM in-process on one device; tensor_parallel_size must be 1")
        from transformers import AutoConfig
        from vllm import LLM, ModelRegistry

        self.model_path = resolve_model(model_path)
        hf_config = AutoConfig.from_pretrained(self.model_path)
        arch = (getattr(hf_config, "architectures", None) or [None])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported by PreftEngine; supported: {list(SUPPORTED_ARCHITECTURES)}")
        cls = preft_model_class(ModelRegistry.models[arch].load_model_cls(), method)
        ModelRegistry.register_model(cls.__name__, cls)

        overrides = dict(vllm_kwargs.pop("hf_overrides", None) or {})
        overrides["architectures"] = [cls.__name__]
        settings = default_vllm_settings(hf_config, cpu_kv_cache_gib)
        settings.update(vllm_kwargs)
        if not settings["enforce_eager"]:
            vllm_compat.add_splitting_ops(SPLITTING_OPS)  # adapter ops stay opaque, outside captured graphs
        # Size the registry before vLLM starts, so an impossible max_adapters fails in seconds.
        shape = ModelShape.from_hf_config(hf_config)
        expected_dtype = getattr(torch, settings["dtype"], None) if settings["dtype"] != "auto" else torch.bfloat16
        expected_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        registry = AdapterRegistry(method, shape, max_adapters, max_rank, expected_dtype or torch.bfloat16, expected_device)
        self._check_registry_fits(registry, expected_device)

        self.llm = LLM(self.model_path, hf_overrides=overrides, **settings)
        self.tokenizer = self.llm.get_tokenizer()

        self._runner = vllm_compat.model_runner(self.llm)
        vllm_compat.rewind_discarded_samples_on_cpu(self.llm)
        model = self._runner.model
        if type(model) is not cls:
            raise RuntimeError(f"vLLM built {type(model).__name__}, not {cls.__name__}; the adapter hooks are missing")
        param = next(model.parameters())
        if (registry.dtype, registry.device) != (param.dtype, param.device):
            registry = AdapterRegistry(method, shape, max_adapters, max_rank, param.dtype, param.device)
        self._runtime = PreftRuntime(registry=registry, runner=self._runner, prompt_only=adapter_scope == "prompt")
        model.preft_runtime = self._runtime
        register_runtime(self._runtime, model.preft_runtime_id)
        vllm_compat.wrap_execute_model(self._runner, self._begin_step, self._end_step)
        self.method, self.adapter_scope = method, adapter_scope
        _track_llm()

    # ------------------------------------------------------------------------------ registry
    @property
    def registry(self) -> AdapterRegistry:
        return self._runtime.registry

    @property
    def adapters(self) -> dict[str, AdapterEntry]:
        """Registered adapters by name (slot, version, rank, config); a copy."""
        return {name: copy.copy(entry) for name, entry in self.registry.entries.items()}

    def add_adapter(
        self, name: str, source: Any, config: PreftConfig | None = None, *, load_peft_lora_as_prefill_only: bool = False
    ) -> AdapterEntry:
        """Register an adapter from a directory (save_pretrained), a PreftModel, or a state dict + config.

        A plain PEFT LoRA directory is refused unless `load_peft_lora_as_prefill_only=True` (as in
        PreftModel.from_pretrained): it was trained to act on every token, and here it acts on prompt tokens only.
        """
        state, config = _adapter_source(source, config, load_peft_lora_as_prefill_only)
        if config.adapter_scope != self.adapter_scope:
            raise ValueError(
                f"adapter {name!r} has adapter_scope={config.adapter_scope!r} but this engine applies adapters with "
                f"adapter_scope={self.adapter_scope!r}; start PreftEngine(..., adapter_scope={config.adapter_scope!r}) to serve it"
            )
        return copy.copy(self.registry.add(name, state, config))

    def update_adapter(self, name: str, state_dict: dict[str, torch.Tensor]) -> AdapterEntry:
        """Replace all of an adapter's tensors in memory (the save_pretrained key format, every key the adapter
        was added with); bumps its version. A refused state leaves the adapter as it was."""
        return copy.copy(self.registry.update(name, state_dict))

    def remove_adapter(self, name: str) -> None:
        self.registry.remove(name)

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling_params: Any = None,
        adapters: Sequence[str | None] | None = None,
        use_tqdm: bool = True,
    ) -> list[Any]:
        """One vLLM RequestOutput per prompt, in order. Prompts: text, token ids, or chat messages."""
        from vllm import SamplingParams

        prompts = list(prompts)
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        if len(adapters) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(adapters)} adapter names; pass one name (or None) per prompt")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params; pass one, or one per prompt")
        entries = []
        for name in adapters:  # every name checked before any work starts
            if name is None:
                entries.append(None)
                continue
            try:
                entries.append(self.registry.get(name))
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        requests, request_params = [], []
        for prompt, entry, sp in zip(prompts, entries, params):
            token_ids = prompt_token_ids(self.tokenizer, prompt)
            request: dict[str, Any] = {"prompt_token_ids": token_ids}
            sp = sp.clone()
            if entry is not None:
                sp.extra_args = {**(sp.extra_args or {}), EXTRA_ARGS_KEY: {"name": entry.name, "version": entry.version}}
                request["cache_salt"] = f"preft:{entry.name}:v{entry.version}:p{len(token_ids)}"
            requests.append(request)
            request_params.append(sp)
        try:
            return self.llm.generate(requests, request_params, use_tqdm=use_tqdm)
        except NonFiniteActivations as exc:
            self._recover_from_failed_step()
            culprits = [name for name in exc.adapters if name is not None]
            named = ", ".join(repr(name) for name in culprits) or "(none: a request without adapter)"
            raise ValueError(
                f"adapter {named} produced non-finite activations (NaN or inf) on its prompt tokens: its weights are "
                "finite but too large for this model. No output of this generate call was returned; the KV cache was "
                "cleared and the engine keeps serving. Fix the adapter (engine.update_adapter with smaller weights, or "
                "engine.remove_adapter) and retry the other requests."
            ) from None
        finally:
            self._runtime.request_slots.clear()

    def _recover_from_failed_step(self) -> None:
        """After a step raised inside vLLM: abort every request of the call, zero the KV cache (so no non-finite value
        survives in a block a later request reuses) and drop the prefix cache (blocks cached by the failed step)."""
        vllm_compat.abort_all_requests(self.llm)
        self._runtime.in_step, self._runtime.selection = False, None
        for cache in vllm_compat.kv_cache_tensors(self._runner):
            cache.zero_()
        if not self.llm.reset_prefix_cache():
            logger.warning("PreftEngine: the prefix cache could not be reset after a failed step (blocks still in use)")

    # ------------------------------------------------------------------------------ lifecycle
    def _begin_step(self) -> None:
        self._runtime.in_step = True

    def _end_step(self) -> None:
        self._runtime.in_step = False
        self._runtime.selection = None

    def sleep(self, level: int = 1) -> None:
        """Free vLLM's GPU memory for colocated training (vLLM sleep mode); a logged no-op without a GPU."""
        if self._device_type() != "cuda":
            logger.warning("PreftEngine.sleep: sleep mode needs a CUDA device; nothing to do on %s", self._device_type())
            return
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        if self._device_type() != "cuda":
            logger.warning("PreftEngine.wake_up: sleep mode needs a CUDA device; nothing to do on %s", self._device_type())
            return
        self.llm.wake_up()

    def close(self) -> None:
        """Release vLLM and its memory; the engine cannot be used afterwards."""
        if getattr(self, "llm", None) is None:
            return
        self._runner.model.preft_runtime = None
        register_runtime(None, self._runner.model.preft_runtime_id)
        _release_llm(self.llm)
        self.llm = self._runner = None

    def __enter__(self) -> PreftEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _device_type(self) -> str:
        return self.registry.device.type

    @staticmethod
    def _check_registry_fits(registry: AdapterRegistry, device: torch.device) -> None:
        per_adapter = registry.bytes_per_adapter()
        total = per_adapter * registry.max_adapters
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        logger.info(
            "adapter registry: %.2f MiB per adapter (rank %d), at most %.1f MiB for %d adapters; %.1f GiB free",
            per_adapter / 2**20, registry.max_rank, total / 2**20, registry.max_adapters, free / 2**30,
        )
        if total > 0.9 * free:
            raise ValueError(
                f"max_adapters={registry.max_adapters} at max_rank={registry.max_rank} needs up to {total / 2**30:.2f} GiB "
                f"({per_adapter / 2**20:.2f} MiB each) but only {free / 2**30:.2f} GiB is free; lower max_adapters or max_rank"
            )


def default_vllm_settings(hf_config: Any, cpu_kv_cache_gib: int = 1) -> dict[str, Any]:
    """The vLLM settings every engine here starts from (the same for PreftEngine and the baselines, so
    benchmarks compare like with like). Also puts vLLM in-process (the model is reachable and the hooks see
    the runner) with a modest CPU KV cache, so users need no environment variables."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
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
    """Token ids of a prompt given as text (special tokens added, as vllm.LLM.generate does), token ids,
    or chat messages (chat template with the generation prompt)."""
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


def _track_llm() -> None:
    global _live_engines
    _live_engines += 1


def _release_llm(llm: Any) -> None:
    """Park a closed engine's vLLM; shut all parked ones down once no engine in the process is live."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    global _live_engines
    _parked.append(llm)
    _live_engines -= 1
    if _live_engines == 0:
        while _parked:
            _parked.pop().llm_engine.engine_core.shutdown()
        destroy_model_parallel()
        destroy_distributed_environment()
    else:
        logger.info("engine closed while other engines are live: its memory is freed when the last one closes")
    gc.collect()


def _adapter_source(
    source: Any, config: PreftConfig | None, load_peft_lora_as_prefill_only: bool = False
) -> tuple[dict[str, torch.Tensor], PreftConfig]:
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
