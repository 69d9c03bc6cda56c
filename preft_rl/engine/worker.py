"""The engine's worker side: a vLLM worker extension that holds the adapter registry, the per-step token selection
and the adapter hooks' runtime, driven from the engine through `collective_rpc`.

vLLM mixes this class into its worker class (`LLM(..., worker_extension_cls=WORKER_EXTENSION)`), in whatever process
the worker lives: the caller's own (in-process), an engine-core process (vLLM's default multiprocess mode), or one
process per tensor-parallel rank. So the same code serves all of them, and every rank applies adds, updates and
removals in the order the engine sends them.

Every RPC returns plain data (dicts, lists, strings) so it crosses processes under vLLM's msgpack serialisation, and
never raises for a bad adapter: it returns {"error": class name, "message": ...}, which the engine raises again as that
class, after checking that every rank agrees. A refused adapter changes nothing on any rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from preft_rl.adapters.config import PreftConfig

from . import vllm_compat
from .model import register_preft_models
from .registry import AdapterEntry, AdapterRegistry, ModelShape, check_is_state, check_is_tensor

WORKER_EXTENSION = "preft_rl.engine.worker.PreftWorkerExtension"
# vLLM imports this module in every worker process (to mix the extension in) before it builds the model: the PreFT
# model classes must be registered there too.
register_preft_models()
vllm_compat.install_scheduler_patches()  # this process may run the scheduler too (in-process, one worker)
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}


def entry_to_dict(entry: AdapterEntry) -> dict[str, Any]:
    return {"name": entry.name, "slot": entry.slot, "version": entry.version, "rank": entry.rank,
            "config": dataclasses.asdict(entry.config), "keys": sorted(entry.keys)}


def entry_from_dict(data: dict[str, Any]) -> AdapterEntry:
    return AdapterEntry(name=data["name"], slot=data["slot"], version=data["version"], rank=data["rank"],
                        config=PreftConfig(**data["config"]), keys=frozenset(data["keys"]))


def pack_state(name: str, state: Any) -> dict[str, Any]:
    """An adapter state as it crosses to a worker in another process: one safetensors blob (vLLM's RPC serialiser does
    not carry tensors as such). The type checks the registry would make on the other side are made here first."""
    from safetensors.torch import save

    check_is_state(name, state)
    for key, value in state.items():
        check_is_tensor(name, key, value)
    return {"safetensors": save({key: value.detach().cpu().contiguous().clone() for key, value in state.items()})}


def unpack_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"safetensors"} and isinstance(state["safetensors"], bytes):
        from safetensors.torch import load

        return load(state["safetensors"])
    return state


def raise_if_error(result: Any) -> Any:
    """Raise the exception a worker RPC reported (same class, same message); pass anything else through."""
    if isinstance(result, dict) and "error" in result:
        raise _ERRORS.get(result["error"], RuntimeError)(result["message"])
    return result


def agreed_result(method: str, results: list[Any]) -> Any:
    """One `collective_rpc` call's result: raise what any rank reported; check that every rank returned the same (so
    all ranks hold the same adapters and versions); return rank 0's."""
    for result in results:
        raise_if_error(result)
    if any(result != results[0] for result in results[1:]):
        raise RuntimeError(f"the engine's ranks disagree after {method}: {results}; restart the engine")
    return results[0]


class PreftWorkerExtension:
    """Methods vLLM adds to its worker; every name starts with `preft_` so none collides with the worker's own."""

    def preft_prepare(self) -> bool:
        """For every engine here, PreFT or baseline: make seeded sampling work with chunked prefill on vLLM-CPU."""
        return vllm_compat.rewind_discarded_samples_on_cpu(vllm_compat.worker_model_runner(self))

    def preft_setup(self, method: str, max_adapters: int, max_rank: int, prompt_only: bool, model_class: str,
                    max_registered: int | None = None) -> dict[str, Any]:
        """Create the registry beside the model (its dtype and device) and attach the runtime the hooks read.
        `max_registered` > max_adapters: slots as a cache (AdapterRegistry)."""
        from .model import PreftRuntime, register_runtime

        runner = vllm_compat.worker_model_runner(self)
        model = vllm_compat.runner_model(runner)
        if type(model).__name__ != model_class:
            raise RuntimeError(f"vLLM built {type(model).__name__}, not {model_class}; the adapter hooks are missing")
        param = next(model.parameters())
        shape = ModelShape.from_hf_config(vllm_compat.runner_hf_config(runner), *vllm_compat.tp_rank_and_size())
        registry = AdapterRegistry(method, shape, max_adapters, max_rank, param.dtype, param.device,
                                   adapter_scope="prompt" if prompt_only else "all", max_registered=max_registered)
        runtime = PreftRuntime(registry=registry, runner=runner, prompt_only=prompt_only)
        model.preft_runtime = runtime
        register_runtime(runtime, model.preft_runtime_id)

        def begin() -> None:
            runtime.in_step = True

        def end() -> None:
            runtime.in_step, runtime.selection = False, None

        vllm_compat.wrap_execute_model(runner, begin, end)
        vllm_compat.wrap_sample_tokens(runner, runtime.take_failed)  # requests failed alone reach the scheduler
        return {"dtype": str(param.dtype).removeprefix("torch."), "device": param.device.type,
                "bytes_per_adapter": registry.bytes_per_adapter()}

    # ------------------------------------------------------------------------------ adapters
    def _preft_model(self) -> Any:
        return vllm_compat.runner_model(vllm_compat.worker_model_runner(self))

    def _preft_registry(self) -> AdapterRegistry:
        runtime = getattr(self._preft_model(), "preft_runtime", None)
        if runtime is None:
            raise RuntimeError("the PreFT runtime is not set up in this worker (preft_setup was not called)")
        return runtime.registry

    @staticmethod
    def _preft_guard(fn, *args) -> Any:
        try:
            return fn(*args)
        except (ValueError, TypeError, KeyError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return {"error": type(exc).__name__, "message": message}

    def preft_add_adapter(self, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
        registry = self._preft_registry()
        return self._preft_guard(lambda: entry_to_dict(registry.add(name, unpack_state(state), PreftConfig(**config))))

    def preft_update_adapter(self, name: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        registry = self._preft_registry()
        return self._preft_guard(lambda: entry_to_dict(registry.update(name, unpack_state(state))))

    def preft_replace_adapter(self, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
        registry = self._preft_registry()
        return self._preft_guard(lambda: entry_to_dict(registry.replace(name, unpack_state(state), PreftConfig(**config))))

    def preft_remove_adapter(self, name: str) -> dict[str, Any]:
        registry = self._preft_registry()
        return self._preft_guard(lambda: registry.remove(name) or {"removed": name})

    def preft_swap_adapters(self, remove: list[str], add: list[list[Any]]) -> dict[str, Any]:
        """Remove the adapters named in `remove`, then add each `[name, state, config]` of `add`: any number of changes
        for one RPC, so one engine step's wait (the server's first-request loads from --adapter-dir). Each add is
        applied or refused alone: {"removed": [names], "added": {name: entry dict, or {"error", "message"}}}."""
        registry = self._preft_registry()
        removed = [name for name in remove if name in registry.entries]
        for name in removed:
            registry.remove(name)
        added = {}
        for name, state, config in add:
            added[name] = self._preft_guard(lambda: entry_to_dict(registry.add(name, unpack_state(state),
                                                                               PreftConfig(**config))))
        return {"removed": removed, "added": added}

    def preft_cache_stats(self) -> dict[str, int]:
        """Slots as a cache: adapters registered, in slots, and loaded into a slot from host memory so far."""
        registry = self._preft_registry()
        return {"registered": len(registry.entries), "resident": sum(e.slot >= 0 for e in registry.entries.values()),
                "loads": registry.loads}

    def preft_broken(self) -> dict[str, int]:
        """{name: version} of the adapters whose current version produced non-finite activations."""
        return self._preft_registry().broken()

    def preft_release(self) -> None:
        from .model import register_runtime

        model = self._preft_model()
        if getattr(model, "preft_runtime", None) is not None:
            model.preft_runtime = None
            register_runtime(None, model.preft_runtime_id)
