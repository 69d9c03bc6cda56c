"""PreftEngine: one vLLM serving many prefill-only adapters per batch.

The base weights are loaded once and never change; adapters are registered by name and applied only
at their own requests' prompt tokens, and never at a token the policy sampled (a multi-turn prompt marks its earlier
turns' sampled tokens by their spans; DESIGN invariant 9). Prefix caching stays on: each adapted prompt carries a cache
salt of (adapter, version), so cached prompt KV is never shared across adapters or versions (a name's versions never
repeat, not even across remove_adapter and a new add_adapter of that name), and each KV block's hash also holds what
the adapter did at its tokens (`vllm_compat.adapter_block_key`): a later turn reuses its earlier turns' blocks exactly,
and KV computed for generated tokens (plain) is never reused where the same tokens are adapted.

Where things run: the adapter registry, the per-step token selection and the hooks live in vLLM's worker
(preft_rl/engine/worker.py, a worker extension), driven through `collective_rpc`; this class keeps a mirror of
the registered adapters (names, slots, versions) to validate and salt requests before they are submitted. vLLM
runs in this process by default (what the colocated trainer needs); `multiprocess=True` runs it in vLLM's own
engine-core process, with the same results.

Compilation: by default the engine runs vLLM eagerly (`enforce_eager=True`: no torch.compile, no CUDA
graphs), which starts in seconds. With `enforce_eager=False` vLLM compiles the model: the adapters are
registered custom ops (`preft_rl::apply_lora`, `preft_rl::apply_reft`) added to vLLM's splitting ops,
so they stay opaque to torch.compile and run eagerly between piecewise graphs, reading each step's
token selection when they run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from preft_rl.adapters.config import PreftConfig

from . import vllm_compat
from .common import Prompt, VllmEngineBase, adapter_source, check_batch, default_vllm_settings, model_settings, prompt_token_ids
from .model import SPLITTING_OPS, SUPPORTED_ARCHITECTURES, FailedRequestsError, preft_architecture, register_preft_models
from .registry import AdapterEntry, AdapterRegistry, ModelShape, unknown_adapter_message
from .worker import entry_from_dict, pack_state

logger = logging.getLogger(__name__)

__all__ = ["PreftEngine", "Prompt", "default_vllm_settings", "prompt_token_ids"]


class PreftEngine(VllmEngineBase):
    """Colocated vLLM with multi-adapter, prefill-only adapter application.

    >>> engine = PreftEngine("smollm2-135m-instruct", max_adapters=64, max_rank=16)   # doctest: +SKIP
    >>> engine.add_adapter("user-7", "path/to/adapter")                                 # doctest: +SKIP
    >>> outs = engine.generate(["2+2="], SamplingParams(max_tokens=8), adapters=["user-7"])  # doctest: +SKIP

    Slots as a cache: `max_adapters` device slots; with `max_cpu_adapters=N` (> max_adapters, like vLLM's
    max_cpu_loras) up to N adapters may be registered, the rest waiting in host memory (validated when added, as
    always). A step's adapters are given slots before it runs, the least recently used adapter the step does not need
    giving up its slot; the scheduler starts a prompt only while the adapters of the prompts being computed fit the
    slots (others wait a step, as vLLM holds back LoRA requests over max_loras). Versions key the prefix cache whether an
    adapter sits in a slot or in host memory, so a reloaded adapter reuses its own cached prompts and an updated one
    never reuses the old version's.
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
        multiprocess: bool = False,
        max_cpu_adapters: int | None = None,
        **vllm_kwargs: Any,
    ) -> None:
        vllm_compat.check_vllm_version()
        if max_cpu_adapters is not None and max_cpu_adapters < max_adapters:
            raise ValueError(f"max_cpu_adapters={max_cpu_adapters} must be >= max_adapters={max_adapters}: it counts every "
                             "registered adapter, those in device slots included (as vLLM's max_cpu_loras)")
        if adapter_scope not in ("prompt", "all"):
            raise ValueError(f"adapter_scope={adapter_scope!r}: use 'prompt' (PreFT) or 'all' (an all-token baseline)")
        tp = int(vllm_kwargs.get("tensor_parallel_size", 1))
        if tp < 1:
            raise ValueError(f"tensor_parallel_size={tp} must be >= 1")
        self.model_path, hf_config, settings = model_settings(model_path, cpu_kv_cache_gib)
        arch = (getattr(hf_config, "architectures", None) or [None])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported by PreftEngine; supported: {list(SUPPORTED_ARCHITECTURES)}")
        overrides = dict(vllm_kwargs.pop("hf_overrides", None) or {})
        settings.update(vllm_kwargs)
        ModelShape.from_hf_config(hf_config, 0, tp)  # a tensor-parallel size the adapters can be sharded by
        # Size the registry before vLLM starts, so a bad method or an impossible max_adapters fails in seconds (on the
        # meta device: nothing is allocated here; the worker allocates the real one beside the model).
        expected_dtype = getattr(torch, settings["dtype"], None) if settings["dtype"] != "auto" else torch.bfloat16
        expected_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sizing = AdapterRegistry(method, ModelShape.from_hf_config(hf_config), max_adapters, max_rank,
                                 expected_dtype or torch.bfloat16, torch.device("meta"))
        self._check_registry_fits(sizing, expected_device)
        if not settings["enforce_eager"]:
            vllm_compat.add_splitting_ops(SPLITTING_OPS)  # adapter ops stay opaque, outside captured graphs

        # Registered by importing the worker extension (in every process); again here for a method registered since
        # (in-process engines: a user's own AdapterMethod). The scheduler's patches (failing one request, block keys) are
        # installed in every vLLM process too (worker module, general plugin); here for an in-process scheduler.
        register_preft_models()
        vllm_compat.install_scheduler_patches()
        model_class = preft_architecture(arch, method)
        settings["hf_overrides"] = {**overrides, "architectures": [model_class]}
        if tp > 1:
            settings.setdefault("distributed_executor_backend", "mp")  # one worker process per rank
        with _cpu_thread_binding(tp, settings.get("distributed_executor_backend"), expected_device):
            self._start_vllm(self.model_path, settings, {}, multiprocess)
        info = self._rpc("preft_setup", method, max_adapters, max_rank, adapter_scope == "prompt", model_class,
                         max_cpu_adapters)
        self._device_type_name = info["device"]
        self.method, self.adapter_scope = method, adapter_scope
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.max_cpu_adapters = max_cpu_adapters or max_adapters
        # slots as a cache: each request carries the slot count, so the scheduler keeps a step's prompt computations
        # within it (vllm_compat.install_adapter_slot_limit); 0: no caching, requests as before
        self._slot_limit = max_adapters if self.max_cpu_adapters > max_adapters else 0
        self._entries: dict[str, AdapterEntry] = {}  # the worker registry's entries, as its RPCs reported them
        self._broken: dict[str, int] = {}  # adapter -> version whose activations went non-finite (refused until updated)

    # ------------------------------------------------------------------------------ registry
    @property
    def _runtime(self) -> Any:
        """The worker's runtime (registry, step selection, spies); in-process only (tests)."""
        runner = self._runner
        return None if runner is None else vllm_compat.runner_model(runner).preft_runtime

    @property
    def registry(self) -> AdapterRegistry:
        """The worker's adapter registry; reachable only when vLLM runs in this process."""
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("the adapter registry lives in vLLM's worker process (multiprocess=True); use engine.adapters")
        return runtime.registry

    @property
    def adapters(self) -> dict[str, AdapterEntry]:
        """Registered adapters by name (slot, version, rank, config); a copy. With max_cpu_adapters > max_adapters the
        slots move as adapters are loaded and evicted: `slot` is where the adapter was when it was added or updated
        (-1: waiting in host memory); cache_stats() counts what is where now."""
        return {name: copy.copy(entry) for name, entry in self._entries.items()}

    def add_adapter(
        self, name: str, source: Any, config: PreftConfig | None = None, *, load_peft_lora_as_prefill_only: bool = False
    ) -> AdapterEntry:
        """Register an adapter from a directory (save_pretrained), a PreftModel, or a state dict + config.

        A plain PEFT LoRA directory is refused unless `load_peft_lora_as_prefill_only=True` (as in
        PreftModel.from_pretrained): it was trained to act on every token, and here it acts on prompt tokens only.
        """
        state, config = adapter_source(source, config, load_peft_lora_as_prefill_only)
        if not isinstance(config, PreftConfig):
            raise TypeError(f"adapter {name!r}: config must be a PreftConfig, got {type(config).__name__}")
        if config.adapter_scope != self.adapter_scope:
            raise ValueError(
                f"adapter {name!r} has adapter_scope={config.adapter_scope!r} but this engine applies adapters with "
                f"adapter_scope={self.adapter_scope!r}; start PreftEngine(..., adapter_scope={config.adapter_scope!r}) to serve it"
            )
        return self._record(self._rpc("preft_add_adapter", name, self._as_state(name, state), dataclasses.asdict(config)))

    def update_adapter(self, name: str, state_dict: dict[str, torch.Tensor]) -> AdapterEntry:
        """Replace all of an adapter's tensors in memory (the save_pretrained key format, every key the adapter
        was added with); bumps its version. A refused state leaves the adapter as it was."""
        return self._record(self._rpc("preft_update_adapter", name, self._as_state(name, state_dict)))

    def remove_adapter(self, name: str) -> None:
        self._rpc("preft_remove_adapter", name)
        self._entries.pop(name, None)

    def _as_state(self, name: str, state: Any) -> Any:
        """The state as the worker takes it: as is in this process, else packed (worker.pack_state)."""
        return pack_state(name, state) if self.multiprocess else state

    def _record(self, data: dict[str, Any]) -> AdapterEntry:
        entry = entry_from_dict(data)
        self._entries[entry.name] = entry
        return copy.copy(entry)

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling_params: Any = None,
        adapters: Sequence[str | None] | None = None,
        use_tqdm: bool = True,
    ) -> list[Any]:
        """One vLLM RequestOutput per prompt, in order. Prompts: text, token ids, chat messages, or a token prompt dict
        {"prompt_token_ids": ids, "sampled_spans": [(start, end), ...]}: a later turn of a conversation, whose spans mark
        the tokens the policy sampled in earlier turns (they stay plain, DESIGN invariant 9; everything else is adapted)."""
        from vllm import SamplingParams

        adapters = check_batch(prompts, adapters)  # first: refuses a bare string before list() splits it into characters
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        for sp in params:
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be a vllm.SamplingParams (or a list, one per prompt), got "
                                f"{type(sp).__name__}" + ("; use SamplingParams(**your_dict)" if isinstance(sp, dict) else ""))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params; pass one, or one per prompt")
        entries = []
        for name in adapters:  # every name checked before any work starts
            if name is not None and name not in self._entries:
                raise ValueError(unknown_adapter_message(name, list(self._entries)))
            if name is not None and self._broken.get(name) == self._entries[name].version:
                raise ValueError(
                    f"adapter {name!r} (version {self._broken[name]}) produced non-finite activations (NaN or inf) earlier "
                    "and is refused until it is fixed: engine.update_adapter with smaller weights, or engine.remove_adapter"
                )
            entries.append(None if name is None else self._entries[name])
        requests, request_params = [], []
        for prompt, entry, sp in zip(prompts, entries, params):  # every prompt checked before any is submitted
            request: dict[str, Any] = {"prompt_token_ids": prompt_token_ids(self.tokenizer, prompt)}
            if isinstance(prompt, dict) and prompt.get(vllm_compat.SAMPLED_SPANS_KEY):
                request[vllm_compat.SAMPLED_SPANS_KEY] = prompt[vllm_compat.SAMPLED_SPANS_KEY]
            if entry is None:
                request, sp = vllm_compat.untag_base_prompt(request), sp.clone()
            else:  # adapter, version and sampled spans in extra_args, the prefix-cache salt: the rule `preft-rl serve` uses too
                first_last = entry.config.first_last
                request, sp = vllm_compat.tag_request(request, sp, entry.name, entry.version, first_last[1] if first_last else 0,
                                                      not entry.config.prefill_only, self._slot_limit)
            requests.append(request)
            request_params.append(sp)
        outputs = self.llm.generate(requests, request_params, use_tqdm=use_tqdm)
        failed = [i for i, output in enumerate(outputs) if vllm_compat.request_failed(output)]
        if failed:
            self._broken = dict(self._rpc("preft_broken"))
            culprits = sorted({name for name in (adapters[i] for i in failed) if name is not None})
            named = ", ".join(repr(name) for name in culprits) or "(none: a request without adapter)"
            raise FailedRequestsError(
                f"{len(failed)} of {len(outputs)} requests failed alone: adapter {named} produced non-finite activations "
                "(NaN or inf) on its prompt tokens (finite weights, too large for this model), so its requests were stopped "
                "before any token; the adapter is refused until engine.update_adapter (smaller weights) or "
                "engine.remove_adapter. Every other request completed as it would have without it: their outputs are in "
                "this error's .outputs (failed indices in .failed).",
                [adapters[i] for i in failed], outputs, failed,
            )
        return outputs

    def cache_stats(self) -> dict[str, int]:
        """Slots as a cache: adapters registered, in device slots, and loaded into a slot from host memory so far."""
        return dict(self._rpc("preft_cache_stats"))

    # ------------------------------------------------------------------------------ lifecycle
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

    def _before_close(self) -> None:
        self._rpc("preft_release")

    def _device_type(self) -> str:
        return self._device_type_name

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


@contextlib.contextmanager
def _cpu_thread_binding(tp: int, backend: str | None, device: torch.device):
    """On CPU, vLLM's TP workers of one machine each need their own cores (VLLM_CPU_OMP_THREADS_BIND, e.g. "0|1"):
    unless the user set a binding, split this process's cores into `tp` contiguous groups while the workers start."""
    if tp == 1 or backend != "mp" or device.type != "cpu" or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        yield
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        raise ValueError(f"tensor_parallel_size={tp} needs at least {tp} CPU cores; this process may use {len(cores)}")
    per = len(cores) // tp
    groups = [cores[i * per : (i + 1) * per] for i in range(tp)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)
    try:
        yield
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
