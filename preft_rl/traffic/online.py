"""The online loop (`preft-rl online`): beside a recording server, train each tenant on its new traffic as it comes
and push the new adapter into the server.

Each round:
1. Read every tenant's log (`TrafficReader.refresh`). A tenant with at least `min_new` new rows (recorded prompts,
   plus served responses with feedback) is ready.
2. Take up to `tenants_per_step` ready tenants (round-robin), at most `rows_per_round` rows each.
3. Train them in one `MultiTenantGRPOTrainer.train_round`: every tenant in every step, each row once. The trainer then
   checkpoints and pushes the changed adapters (`push_to_server`).

Restart safety. The readers' positions go into the trainer's checkpoint (`driver_state`), written atomically with the
adapters and AdamW state. A kill at any point resumes from the last checkpoint: the rows of an unfinished round are
read again and trained once in the adapters that survive. None is lost and none is trained twice.

Failures.
- If a round raises (a reward function, a non-finite update, the engine), the trainer goes back to the last checkpoint,
  readers included. A failed round of several tenants is retried one tenant at a time; a tenant that fails alone waits
  `retry_after` rounds. The other tenants go on.
- A push that fails leaves the trained adapter in the checkpoint, and the next save pushes it again.
- SIGTERM (or SIGINT) stops after the round in progress.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from .data import TrafficReader, traffic_dataset

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class OnlineConfig:
    min_new: int = 8  # new rows a tenant needs before it is trained
    rows_per_round: int | None = None  # at most this many rows per tenant per round (default: min_new)
    interval_s: float = 5.0  # wait between reads when no tenant is ready
    max_rounds: int | None = None  # stop after this many rounds (None: until SIGTERM)
    max_staleness: int | None = 2  # served responses more than this many versions old are dropped
    max_age_s: float | None = None  # recorded prompts older than this are skipped
    retry_after: int = 3  # rounds a tenant that failed alone waits
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_new < 1:
            raise ValueError(f"min_new={self.min_new} must be >= 1")
        if self.rows_per_round is not None and self.rows_per_round < self.min_new:
            raise ValueError(f"rows_per_round={self.rows_per_round} must be >= min_new={self.min_new}")
        if self.interval_s < 0 or self.retry_after < 0:
            raise ValueError(f"interval_s={self.interval_s} and retry_after={self.retry_after} must be >= 0")


class OnlineLoop:
    """Drives a MultiTenantGRPOTrainer (built by the caller, lr_scheduler_type='constant', push_to_server set to push)
    over a traffic store; `run()` until SIGTERM or max_rounds, or `step_round()` once."""

    def __init__(self, trainer: Any, store: Any, config: OnlineConfig, clock: Callable[[], float] = time.time) -> None:
        self.trainer, self.store, self.config, self.clock = trainer, store, config, clock
        self.names = list(trainer.tenant_names)
        self.readers = {name: TrafficReader(store, name, seed=config.seed, max_age_s=config.max_age_s,
                                            max_staleness=config.max_staleness) for name in self.names}
        self.rounds = 0
        self.solo: set[str] = set()  # tenants to retry one at a time (their last round failed with others)
        self.waiting: dict[str, int] = {}  # tenant -> round it may be trained again (failed alone)
        self.stopping = False
        self.history: list[dict[str, Any]] = []
        from preft_rl.trainers import checkpoint

        if checkpoint.latest(trainer.args.output_dir) is not None:
            trainer.load_checkpoint()
            self._restore(trainer.driver_state)
            logger.info("online: resumed at step %d from %s", trainer.step, checkpoint.latest(trainer.args.output_dir))
        else:  # a checkpoint to go back to if the first round fails
            self._remember()
            checkpoint.save(trainer, trainer.step, None)

    # ------------------------------------------------------------------------------ state
    def _remember(self) -> None:
        self.trainer.driver_state = {"readers": {n: r.state_dict() for n, r in self.readers.items()},
                                     "rounds": self.rounds}

    def _restore(self, state: dict[str, Any]) -> None:
        for name, reader_state in state.get("readers", {}).items():
            if name in self.readers:
                self.readers[name].load_state_dict(reader_state)
        self.rounds = int(state.get("rounds", 0))

    def version(self, name: str) -> int:
        """The adapter version the server serves for `name` (1 before any push: its first load)."""
        return self.trainer.served_versions.get(name, 1)

    # ------------------------------------------------------------------------------ rounds
    @property
    def prompts_per_step(self) -> int:
        """Rows one round step takes per tenant (a round's rows are a multiple of it, so each is trained once)."""
        args = self.trainer.args
        return args.generation_batch_size(1) // args.num_generations * self.trainer.accelerator.num_processes

    def ready(self) -> list[str]:
        for reader in self.readers.values():
            reader.refresh(self.clock())
        need = max(self.config.min_new, self.prompts_per_step)
        return [name for name in self.names if sum(self.readers[name].available().values()) >= need
                and self.waiting.get(name, 0) <= self.rounds]

    def _pick(self, ready: list[str]) -> list[str]:
        if solo := [name for name in ready if name in self.solo]:
            return solo[:1]
        k = self.trainer.args.tenants_per_step or len(ready)
        start = self.rounds % len(ready)
        return sorted((ready[start:] + ready[:start])[:k])

    def step_round(self) -> dict[str, Any] | None:
        """One round if any tenant is ready: {"tenants", "rows", "step"} (or "failed"); None if none is."""
        ready = self.ready()
        if not ready:
            return None
        picked = self._pick(ready)
        step_rows = self.prompts_per_step
        limit = self.config.rows_per_round or self.config.min_new
        # the same number of rows for each, a multiple of a step's: every row once, no tenant going round its rows
        rows = min(limit, *(sum(self.readers[n].available().values()) for n in picked)) // step_rows * step_rows
        datasets = {}
        for name in picked:
            reader = self.readers[name]
            try:
                datasets[name] = traffic_dataset(reader, prompts=rows, served=min(reader.available()["served"], rows),
                                                 current_version=self.version(name), total=rows)
            except ValueError:  # everything it had was stale feedback, now dropped
                continue
        if not datasets:
            return None
        self.rounds += 1
        self._remember()  # what the readers gave away goes into the round's checkpoint with the adapters
        picked = sorted(datasets)
        try:
            self.trainer.train_round(datasets)
        except Exception as exc:  # back to the last checkpoint (adapters, AdamW, readers), isolate, go on
            logger.exception("online: round %d (%s) failed", self.rounds, ", ".join(picked))
            failed_round = self.rounds
            self.trainer.load_checkpoint()
            self._restore(self.trainer.driver_state)
            self.rounds = failed_round
            if len(picked) > 1:
                self.solo.update(picked)
            else:
                self.solo.discard(picked[0])
                self.waiting[picked[0]] = self.rounds + self.config.retry_after
            result = {"round": self.rounds, "tenants": picked, "failed": f"{type(exc).__name__}: {exc}"}
        else:
            self.solo -= set(picked)
            result = {"round": self.rounds, "tenants": sorted(datasets), "rows": {n: len(d) for n, d in datasets.items()},
                      "step": self.trainer.step, "versions": {n: self.trainer.served_versions.get(n) for n in picked}}
        self.history.append(result)
        logger.info("online: %s", result)
        return result

    def run(self) -> list[dict[str, Any]]:
        """Rounds until SIGTERM / SIGINT (after the round in progress) or max_rounds."""
        def stop(signum, frame):  # noqa: ARG001
            logger.info("online: signal %d, stopping after this round", signum)
            self.stopping = True

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping and (self.config.max_rounds is None or self.rounds < self.config.max_rounds):
                if self.step_round() is None:
                    time.sleep(self.config.interval_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.history
