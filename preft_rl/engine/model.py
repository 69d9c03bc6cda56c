"""vLLM model classes with prefill-only adapters, and the per-step token selection that drives them.

`preft_model_class(LlamaForCausalLM)` returns a subclass registered with vLLM under "Preft<Arch>" and
selected with `hf_overrides={"architectures": [...]}`, so the adapter hooks exist from construction,
before vLLM loads weights, profiles or compiles anything; module names (and so weight loading) are
unchanged because adapters are forward hooks, not replaced modules.

Per forward step, `StepSelection.build` turns vLLM's batch layout into the tokens each adapter slot
acts on: token t of request i is adapted iff its absolute position < prompt_len(i) and it lies in none of the
request's sampled spans (a multi-turn prompt's earlier completions, DESIGN invariant 9). Decided by position and
recorded origin, never by "is this a prefill step" or by what is cached, so chunked prefill, mixed batches, n > 1
children, prefix-cache hits and recomputed preempted requests are all handled by the same rule. A step with no adapted prompt token
(every pure-decode step) gets no selection; in eager mode the hooks are then not even attached
(`AdapterHooks`), so such a step runs exactly plain vLLM's modules.
The adapter math is preft_rl.kernels: Triton on CUDA, the torch reference on CPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from preft_rl.adapters.methods import get_method, method_names
from preft_rl.kernels import AdapterTokenMetadata

from . import vllm_compat
from .registry import AdapterRegistry, ModelShape

EXTRA_ARGS_KEY = vllm_compat.EXTRA_ARGS_KEY  # sampling_params.extra_args[...] = {"name": ..., "version": ...}


class FailedRequestsError(ValueError):
    """Some requests of a generate call failed alone (DESIGN invariant 8): their adapter produced non-finite
    activations (NaN or inf) on their prompt, or the adapter version they were submitted for is broken or gone. Every
    other request of the call completed exactly as without them.

    `adapters`: the failed requests' adapters (None: a request without adapter); `outputs`: every RequestOutput of
    the call, in order; `failed`: the indices of the failed ones (finish_reason "error", no tokens to use)."""

    def __init__(self, message: str, adapters: list[str | None], outputs: list, failed: list[int]) -> None:
        super().__init__(message)
        self.adapters, self.outputs, self.failed = adapters, outputs, failed


@dataclass(frozen=True)
class StepSelection:
    """Where adapters act in one forward step: each token's adapter slot (-1: none), grouped by slot
    once per step into the kernels' metadata and reused by every layer.

    ReFT adapters with separate first/last interventions act in two passes per layer: `metadata` drives
    the main tensors ('shared' interventions at first|last positions, 'first' ones at first positions),
    then `last_metadata` drives the "last.*" tensors at last positions, so a token in both ranges gets
    'first', then 'last', as in the HF model."""

    token_slot: np.ndarray  # (T,) int: slot of each token's adapter where it acts (first pass), else -1
    metadata: AdapterTokenMetadata
    last_metadata: AdapterTokenMetadata | None = None  # the second ReFT pass; None when no split adapter acts

    @cached_property  # read by every ReFT layer of the step
    def active_slots(self) -> list[int]:
        ids = set(self.metadata.active_ids_host)
        if self.last_metadata is not None:
            ids.update(self.last_metadata.active_ids_host)
        return sorted(ids)

    @property
    def num_adapters(self) -> int:
        return len(self.active_slots)

    @staticmethod
    def build(
        registry: AdapterRegistry,
        layout: vllm_compat.BatchLayout,
        request_slots: np.ndarray,
        device: torch.device,
        prompt_only: bool = True,
        num_tokens: int | None = None,
        request_spans: dict[int, np.ndarray] | None = None,
    ) -> StepSelection | None:
        """`request_spans`: {index of a request in the batch: its (k, 2) [start, end) spans of prompt tokens the policy
        sampled in earlier turns}, for the requests that have any."""
        if not (request_slots >= 0).any():
            return None
        req_index, position = layout.token_positions()
        slot = request_slots[req_index]
        prompt_len = layout.num_prompt[req_index]
        sampled, run_start, run_end = token_runs(req_index, position, prompt_len, request_spans or {})
        if not prompt_only:  # the all-token baseline (adapter_scope="all"): every token of an adapted request
            acts = slot >= 0
        else:  # DESIGN invariant 9: prompt tokens the policy did not sample
            acts = (slot >= 0) & (position < prompt_len) & ~sampled
        # Position windows (ReFT's 'fN+lM': the first N and last M tokens of each run of adapted tokens; every token for
        # an adapter without positions: first_n = NO_LIMIT) and the second pass of adapters that use the method's
        # extended set (separate 'last' interventions).
        safe = np.maximum(slot, 0)
        split = registry.split[safe] & (slot >= 0)
        if prompt_only:  # the first N / last M tokens of the token's run
            in_first, in_last = position - run_start < registry.first_n[safe], position >= run_end - registry.last_m[safe]
            acts_last = acts & split & in_last
            acts &= in_first | (in_last & ~split)
        else:  # every token is in both ranges
            acts_last = acts & split
        if not acts_last.any():
            acts_last = None
        if not acts.any() and acts_last is None:
            return None
        size = max(num_tokens or 0, len(slot))  # padded tokens: no adapter

        def grouped(mask: np.ndarray) -> tuple[np.ndarray, AdapterTokenMetadata]:
            token_slot = np.full(size, -1, dtype=np.int32)
            token_slot[: len(slot)] = np.where(mask, slot, -1)
            # Grouped on the host from a host index: no device sync.
            return token_slot, AdapterTokenMetadata.build(torch.from_numpy(token_slot), device=device)

        token_slot, metadata = grouped(acts)
        last_metadata = None if acts_last is None else grouped(acts_last)[1]
        return StepSelection(token_slot=token_slot, metadata=metadata, last_metadata=last_metadata)


def token_runs(req_index: np.ndarray, position: np.ndarray, prompt_len: np.ndarray,
               request_spans: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each scheduled token (its request's index in the batch and its absolute position): (sampled by the policy in
    an earlier turn, start of its run of adapted tokens, end of that run), all (T,). A request without sampled spans has
    one run, its prompt [0, prompt_len); otherwise runs lie between the spans and the last one ends at prompt_len."""
    sampled = np.zeros(len(position), dtype=bool)
    run_start = np.zeros(len(position), dtype=np.int64)
    run_end = np.array(prompt_len, dtype=np.int64)
    for i, spans in request_spans.items():
        tokens = np.flatnonzero(req_index == i)
        if not len(tokens):
            continue
        starts, ends, at = spans[:, 0], spans[:, 1], position[tokens]
        before = np.searchsorted(starts, at, side="right") - 1  # the last span starting at or before each token
        has_before = before >= 0
        sampled[tokens] = has_before & (at < ends[np.maximum(before, 0)])
        run_start[tokens] = np.where(has_before, ends[np.maximum(before, 0)], 0)
        after = before + 1  # the first span after the token: where its run ends
        run_end[tokens] = np.where(after < len(starts), starts[np.minimum(after, len(starts) - 1)], prompt_len[tokens])
    return sampled, run_start, run_end


@dataclass
class PreftRuntime:
    """What the engine attaches to the vLLM model: the registry, the runner, and this step's selection."""

    registry: AdapterRegistry
    runner: object
    prompt_only: bool = True
    selection: StepSelection | None = None
    in_step: bool = False
    request_adapters: dict[str, str | None] = field(default_factory=dict)  # request -> its adapter (None: base, failed)
    request_spans: dict[str, np.ndarray] = field(default_factory=dict)  # (k, 2) sampled spans of multi-turn requests
    # spies for tests and reports: (tokens in the forward, adapters acting in it) per forward, the latest 4096 only
    # (a server runs for millions of steps)
    step_log: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=4096))
    adapter_calls: int = 0
    on_selection: Callable[[StepSelection | None], None] | None = None
    failed: set[str] = field(default_factory=set)  # requests failed alone (forgotten with finished requests)
    failed_pending: list[str] = field(default_factory=list)  # failed since the last step output

    def isolate_non_finite(self, hidden: torch.Tensor) -> None:
        """Fail, alone, every request whose tokens in this adapter step went non-finite (NaN / inf).

        A non-finite K or V of a prompt token makes that token's own last hidden state non-finite (it attends to
        itself), so this check on the model's output catches every non-finite value written to the KV cache in the
        step. One reduction over (tokens, hidden) on steps that apply adapters only; decode steps are never checked.
        A failed request's rows are zeroed (nothing non-finite reaches the sampler), its KV blocks are zeroed (nothing
        non-finite stays in a block a later request gets), its adapter version is marked broken (every request of it,
        running or later, fails: they may share the zeroed prefix blocks) and the scheduler finishes it with
        finish_reason "error" at the end of this step (vllm_compat: failing one request)."""
        rows_finite = torch.isfinite(hidden).all(dim=-1)
        if bool(rows_finite.all()):
            return
        layout = vllm_compat.batch_layout(self.runner)
        bad = torch.nonzero(~rows_finite).flatten().cpu().numpy()
        failed_rows = []
        for i, req_id in enumerate(layout.req_ids):
            start, end = int(layout.query_start[i]), int(layout.query_start[i + 1])
            if ((bad >= start) & (bad < end)).any():
                failed_rows.append(i)
                hidden[start:end] = 0
                name = self.request_adapters.get(req_id)
                if name is not None and name in self.registry.entries:
                    self.registry.mark_broken(name)
                    # every live request of this adapter fails too (it may read the prefix blocks zeroed below)
                    self.fail_requests([r for r, n in self.request_adapters.items() if n == name])
                self.fail_requests([req_id])
        vllm_compat.zero_request_kv_blocks(self.runner, failed_rows)

    def fail_requests(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            if req_id not in self.failed:
                self.failed.add(req_id)
                self.failed_pending.append(req_id)

    def take_failed(self) -> list[str]:
        """Requests failed since the last call: marked on this step's output for the scheduler."""
        taken, self.failed_pending = self.failed_pending, []
        return taken

    def adapter_of(self, req_id: str) -> str | None:
        """The adapter a request is served with (None: the base model, or a request failed alone), looked up once."""
        if req_id not in self.request_adapters:
            ref = vllm_compat.request_adapter(self.runner, req_id)
            name = None
            if ref is not None:
                entry = self.registry.entries.get(ref["name"])
                if entry is None or entry.version != ref["version"] or self.registry.is_broken(entry.name):
                    # submitted for an adapter version that is gone, replaced or broken: this request fails alone
                    # (the engine and the server refuse such requests before they reach the engine; this is the last line)
                    self.fail_requests([req_id])
                else:
                    name = entry.name
                    spans = vllm_compat.sampled_spans_of(ref)
                    if len(spans):
                        self.request_spans[req_id] = spans
            self.request_adapters[req_id] = name
        return self.request_adapters[req_id]

    def begin_forward(self, num_tokens: int, device: torch.device) -> None:
        self.selection = None
        if self.in_step:
            layout = vllm_compat.batch_layout(self.runner)
            if len(self.request_adapters) > 2 * len(layout.req_ids) + 256:  # forget finished requests
                live = set(vllm_compat.live_request_ids(self.runner))
                self.request_adapters = {req: name for req, name in self.request_adapters.items() if req in live}
                self.request_spans = {req: spans for req, spans in self.request_spans.items() if req in live}
                self.failed &= live
            slots = np.full(len(layout.req_ids), -1, dtype=np.int64)
            # prompt-only: a request acts only while its prompt is being computed, so a pure-decode step
            # looks up no adapter at all
            busy = np.flatnonzero(layout.num_computed < layout.num_prompt) if self.prompt_only else range(len(slots))
            names = {i: self.adapter_of(layout.req_ids[i]) for i in busy}
            if self.registry.caching:  # slots as a cache: this step's adapters get slots (least recently used evicted)
                self.registry.make_resident([name for name in names.values() if name is not None])
            for i, name in names.items():
                slots[i] = -1 if name is None else self.registry.entries[name].slot
            spans = {i: self.request_spans[layout.req_ids[i]] for i in busy if layout.req_ids[i] in self.request_spans}
            self.selection = StepSelection.build(self.registry, layout, slots, device, self.prompt_only, num_tokens, spans)
            self.step_log.append((num_tokens, 0 if self.selection is None else self.selection.num_adapters))
            if self.on_selection is not None:
                self.on_selection(self.selection)


# ------------------------------------------------------------------------------------ adapter ops
# The hooks call these through registered torch custom ops, so that under torch.compile each one is an
# opaque call (and a splitting op for piecewise graphs) that reads the step's selection when it runs,
# instead of a Python branch that Dynamo would freeze at trace time.
_RUNTIMES: dict[int, PreftRuntime] = {}


def register_runtime(runtime: PreftRuntime | None, runtime_id: int) -> None:
    if runtime is None:
        _RUNTIMES.pop(runtime_id, None)
    else:
        _RUNTIMES[runtime_id] = runtime


def _apply_linear(x: torch.Tensor, out: torch.Tensor, runtime_id: int, layer: int, module_index: int) -> None:
    runtime = _RUNTIMES.get(runtime_id)
    selection = None if runtime is None else runtime.selection
    if selection is None:
        return
    runtime.adapter_calls += 1
    reg = runtime.registry
    module = reg.spec.engine_linear_modules(reg.shape)[module_index]
    reg.spec.engine_apply_linear(x, out, reg.tensors, layer, module, selection.metadata, reg.shape, vllm_compat.tp_all_reduce)


def _apply_residual(hidden: torch.Tensor, residual: torch.Tensor, runtime_id: int, layer: int) -> None:
    runtime = _RUNTIMES.get(runtime_id)
    selection = None if runtime is None else runtime.selection
    if selection is None:
        return
    reg = runtime.registry
    if not reg.layer_mask[selection.active_slots, layer].any():
        return  # no adapter of this step acts after this layer (the others hold exact zeros here)
    runtime.adapter_calls += 1
    # The residual stream is hidden + residual. Fold it into `residual` and zero `hidden`: the next
    # layer's fused add then sees exactly the edited stream.
    residual.add_(hidden)
    hidden.zero_()
    passes = [("", selection.metadata)]
    if selection.last_metadata is not None:
        passes.append(("last.", selection.last_metadata))
    reg.spec.engine_apply_residual(residual, reg.tensors, layer, passes)


def _register_ops() -> None:
    global _LIB
    _LIB = torch.library.Library("preft_rl", "FRAGMENT")
    vllm_compat.register_custom_op("apply_linear", _apply_linear, mutates_args=["out"], fake_impl=lambda *a: None, lib=_LIB)
    vllm_compat.register_custom_op(
        "apply_residual", _apply_residual, mutates_args=["hidden", "residual"], fake_impl=lambda *a: None, lib=_LIB
    )


_LIB = None
_register_ops()
SPLITTING_OPS = ["preft_rl::apply_linear", "preft_rl::apply_residual"]


def _linear_hook(model: nn.Module, layer: int, module_index: int) -> Callable:
    def hook(module: nn.Module, args: tuple, output):
        out = output[0] if isinstance(output, tuple) else output  # (T, d_out_total), edited in place
        torch.ops.preft_rl.apply_linear(args[0], out, model.preft_runtime_id, layer, module_index)
        return output

    return hook


def _residual_hook(model: nn.Module, layer: int) -> Callable:
    def hook(module: nn.Module, args: tuple, output):
        hidden, residual = output
        torch.ops.preft_rl.apply_residual(hidden, residual, model.preft_runtime_id, layer)
        return hidden, residual

    return hook


class AdapterHooks:
    """The forward hooks that apply adapters (a 'linear'-site method such as LoRA: after each fused linear module it
    names; a 'residual'-site method such as ReFT: after each decoder layer).

    Eager (vLLM's compilation mode NONE, e.g. enforce_eager): the hooks are attached only while a step applies an
    adapter, so a pure-decode step runs vLLM's modules exactly as plain vLLM does (no hook, no op call; measured as
    the whole of PreftEngine's decode overhead at small batch). Compiled: the graph is traced once with the hooks,
    so they stay attached, and each op returns at once on a step without a selection."""

    def __init__(self, model: nn.Module, method: str, always: bool, shape: Any) -> None:
        spec = get_method(method)
        linear_modules = spec.engine_linear_modules(shape)
        self.specs: list[tuple[nn.Module, Callable]] = []
        for i, layer in enumerate(vllm_compat.decoder_layers(model)):
            self.specs += [(layer.get_submodule(name), _linear_hook(model, i, index)) for index, name in enumerate(linear_modules)]
            if spec.site == "residual":
                self.specs.append((layer, _residual_hook(model, i)))
        self.always = always
        self.handles: list[Any] = []
        if always:
            self.attach()

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> None:
        if not self.handles:
            self.handles = [module.register_forward_hook(hook) for module, hook in self.specs]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def for_step(self, applies_adapters: bool) -> None:
        if self.always:
            return
        if applies_adapters:
            self.attach()
        else:
            self.detach()


_CLASSES: dict[str, type] = {}


def preft_model_class(base_cls: type, method: str) -> type:
    """A subclass of a vLLM causal-LM class that carries prefill-only adapter hooks (cached per base, method)."""
    key = f"Preft{method.capitalize()}{base_cls.__name__}"
    if key in _CLASSES:
        return _CLASSES[key]

    def __init__(self, *, vllm_config, prefix: str = ""):
        base_cls.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.preft_runtime = None  # attached by PreftEngine once vLLM is up
        self.preft_runtime_id = id(self)  # how the custom ops find the runtime (a constant under compile)
        shape = ModelShape.from_hf_config(vllm_compat.vllm_config_hf_config(vllm_config))  # the fused module names
        self.preft_hooks = AdapterHooks(self, method, not vllm_compat.compilation_is_eager(vllm_config), shape)

    def forward(self, input_ids, positions, *args, **kwargs):
        runtime = self.preft_runtime
        if runtime is not None:
            runtime.begin_forward(int(positions.shape[-1]), positions.device)
        self.preft_hooks.for_step(runtime is not None and runtime.selection is not None)
        try:
            hidden = base_cls.forward(self, input_ids, positions, *args, **kwargs)
            if runtime is not None and runtime.selection is not None and isinstance(hidden, torch.Tensor):
                runtime.isolate_non_finite(hidden)  # before anything of this step reaches a sampler or a later step
            return hidden
        finally:
            if runtime is not None:
                runtime.selection = None

    cls = type(key, (base_cls,), {"__init__": __init__, "forward": forward, "__module__": __name__})
    _CLASSES[key] = cls
    return cls


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def preft_architecture(arch: str, method: str) -> str:
    """The name vLLM knows the PreFT class of a base architecture by (`hf_overrides={"architectures": [...]}`)."""
    return f"Preft{method.capitalize()}{arch}"


def register_preft_models() -> None:
    """Register the PreFT model class of every architecture and registered adapter method with vLLM's model registry
    in this process. vLLM's registry is per process, so this runs wherever the worker extension is imported (the
    caller, an engine-core process, every TP rank), and again when an engine starts (a method registered since)."""
    for arch in SUPPORTED_ARCHITECTURES:
        base = vllm_compat.model_registry_load(arch)
        for method in method_names():
            cls = preft_model_class(base, method)
            if not vllm_compat.model_registry_has(cls.__name__):
                vllm_compat.model_registry_register(cls.__name__, cls)
