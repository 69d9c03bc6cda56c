"""A tenant's training material from its traffic log: which recorded requests a training step uses, in which order,
each at most once per role, resumable after a crash.

Two roles (issue 33's design; the trainer that uses them is the next step):
- **prompt**: a recorded request's prompt becomes a training prompt; its group is sampled on the trainer's engine and
  scored by the tenant's reward functions (live traffic has one completion per prompt; GRPO needs a group).
- **served**: a recorded response that got feedback joins a group of its own prompt as an off-policy member, with the
  user's reward, corrected by a truncated importance weight against the current policy using the log-probs recorded
  when it was served (`TrafficRecord.logprobs`); it is dropped when its adapter version is more than `max_staleness`
  versions behind the one being trained.

Order. New material is read in blocks (everything committed since the last read); each block is put in a seeded
order that depends only on (seed, tenant, role, block number), so the same log and seed give the same sequence.
Records older than `max_age_s` when read are skipped (the recent window).

Resuming. `state_dict()` is the read position in the log and the read-but-unused items of each role (by seq); a
checkpoint holds it, and `load_state_dict` on restart reads those items again: nothing is used twice in one role and
nothing is lost, whatever was used after the checkpoint (that step is redone).
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

from .store import FeedbackRow, TrafficRecord

ROLES = ("prompt", "served")


@dataclasses.dataclass
class TrafficCounts:
    """What a reader has passed over so far: records outside the window, served items too stale."""

    too_old: int = 0
    stale: int = 0


class TrafficReader:
    """One tenant's traffic for training (see the module docstring). `store`: a TrafficStore (its read, read_seqs,
    read_feedback and feedback_seqs)."""

    def __init__(self, store: Any, tenant: str, seed: int = 0, max_age_s: float | None = None,
                 max_staleness: int | None = 2) -> None:
        if max_age_s is not None and not max_age_s > 0:
            raise ValueError(f"max_age_s={max_age_s!r} must be > 0 (or None: every record)")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness!r} must be >= 0 versions (or None: any age)")
        self.store, self.tenant, self.seed = store, tenant, seed
        self.max_age_s, self.max_staleness = max_age_s, max_staleness
        self.position = {role: 0 for role in ROLES}  # last seq read from the log (records; feedback)
        self.blocks = {role: 0 for role in ROLES}
        self.pending: dict[str, list[Any]] = {role: [] for role in ROLES}  # read, not yet used, in their order
        self.counts = TrafficCounts()

    # ------------------------------------------------------------------------------ reading
    def _order(self, role: str, items: list[Any]) -> list[Any]:
        rng = random.Random(f"{self.seed}:{self.tenant}:{role}:{self.blocks[role]}")
        self.blocks[role] += 1
        items = list(items)
        rng.shuffle(items)
        return items

    def refresh(self, now: float | None = None) -> None:
        """Read what was committed since the last read (both roles) into the pending queues."""
        now = time.time() if now is None else now
        records = self.store.read(self.tenant, after=self.position["prompt"])
        if records:
            self.position["prompt"] = records[-1].seq
            fresh = [r for r in records if self.max_age_s is None or r.time >= now - self.max_age_s]
            self.counts.too_old += len(records) - len(fresh)
            self.pending["prompt"] += self._order("prompt", fresh)
        feedback = self.store.read_feedback(self.tenant, after=self.position["served"])
        if feedback:
            self.position["served"] = feedback[-1].seq
            self.pending["served"] += self._order("served", feedback)

    def available(self) -> dict[str, int]:
        return {role: len(items) for role, items in self.pending.items()}

    def take_prompts(self, count: int) -> list[TrafficRecord]:
        """The next `count` (or fewer) records to train on as prompts; each is given once."""
        taken, self.pending["prompt"] = self.pending["prompt"][:count], self.pending["prompt"][count:]
        return taken

    def take_served(self, count: int, current_version: int) -> list[FeedbackRow]:
        """The next `count` (or fewer) responses with feedback whose adapter version is at most `max_staleness` behind
        `current_version`; staler ones are dropped (counted in `counts.stale`)."""
        taken: list[FeedbackRow] = []
        queue = self.pending["served"]
        while queue and len(taken) < count:
            row = queue.pop(0)
            if self.max_staleness is not None and current_version - row.record.version > self.max_staleness:
                self.counts.stale += 1
                continue
            taken.append(row)
        return taken

    # ------------------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "seed": self.seed, "position": dict(self.position), "blocks": dict(self.blocks),
                "pending": {role: [item.seq for item in items] for role, items in self.pending.items()},
                "counts": dataclasses.asdict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`: the same position, and the pending items read again from the store. Checked
        before anything changes: another tenant's or seed's state, or pending items the store no longer has (pruned),
        raise ValueError."""
        if state.get("tenant") != self.tenant or state.get("seed") != self.seed:
            raise ValueError(f"traffic reader state of tenant {state.get('tenant')!r} seed {state.get('seed')!r} cannot "
                             f"resume tenant {self.tenant!r} seed {self.seed!r}")
        records = self.store.read_seqs(self.tenant, state["pending"]["prompt"])
        feedback = self.store.read_feedback_seqs(self.tenant, state["pending"]["served"])
        for role, found in (("prompt", records), ("served", feedback)):
            if len(found) != len(state["pending"][role]):
                raise ValueError(f"tenant {self.tenant!r}: {len(state['pending'][role]) - len(found)} {role} items of the "
                                 "checkpoint are no longer in the traffic store (pruned?); resume from a newer checkpoint "
                                 "or keep records longer (--record-max-age-days)")
        by_seq = {"prompt": {r.seq: r for r in records}, "served": {f.seq: f for f in feedback}}
        self.position, self.blocks = dict(state["position"]), dict(state["blocks"])
        self.pending = {role: [by_seq[role][seq] for seq in state["pending"][role]] for role in ROLES}
        self.counts = TrafficCounts(**state["counts"])


SERVED_COLUMNS = ("served_completion_ids", "served_logps", "served_reward", "served_staleness")


def traffic_rows(prompts: list[TrafficRecord], served: list[FeedbackRow], current_version: int) -> list[dict[str, Any]]:
    """Training rows of a tenant's traffic, for `Tenant(name, traffic_dataset(...), rewards)`: one per served response
    with feedback (its group: num_generations - 1 fresh completions and the served one, whose reward is the feedback),
    then one per recorded prompt (its group: num_generations fresh completions). The prompt is the recorded token ids
    with the spans the server kept plain (earlier assistant turns), exactly what the server's adapter saw."""
    def prompt(rec: TrafficRecord) -> dict[str, Any]:
        return {"prompt_token_ids": list(rec.prompt_ids), "sampled_spans": [list(span) for span in rec.sampled_spans]}

    rows = []
    for row in served:
        rec = row.record
        rows.append({"prompt": prompt(rec), "traffic_id": rec.id, "traffic_choice": rec.choice,
                     "served_completion_ids": list(rec.completion_ids), "served_logps": list(rec.logprobs),
                     "served_reward": float(row.reward), "served_staleness": current_version - rec.version})
    for rec in prompts:
        rows.append({"prompt": prompt(rec), "traffic_id": rec.id, "traffic_choice": rec.choice,
                     "served_completion_ids": [], "served_logps": [], "served_reward": float("nan"), "served_staleness": -1})
    return rows


def traffic_dataset(reader: TrafficReader, prompts: int, served: int, current_version: int,
                    total: int | None = None) -> Any:
    """A `datasets.Dataset` of the next `served` responses with feedback and `prompts` recorded prompts (fewer if the
    log has fewer) of `reader`'s tenant (`traffic_rows`); taken from the reader, so none is given twice. With `total`,
    recorded prompts fill the rows up to `total` (stale served responses are dropped, so their places are filled)."""
    from datasets import Dataset

    reader.refresh()
    served_rows = reader.take_served(served, current_version)
    prompt_rows = reader.take_prompts(prompts if total is None else total - len(served_rows))
    rows = traffic_rows(prompt_rows, served_rows, current_version)
    if not rows:
        raise ValueError(f"tenant {reader.tenant!r} has no new traffic to train on (nothing recorded since the last read)")
    return Dataset.from_list(rows)


def served_member(row: dict[str, Any]) -> bool:
    """Whether a training row carries a served response with feedback (an off-policy group member)."""
    return bool(row.get("served_completion_ids")) and row.get("served_reward") == row.get("served_reward")  # not NaN


def read_traffic(directory: Any, tenant: str, seed: int = 0, max_age_s: float | None = None,
                 max_staleness: int | None = 2) -> Any:
    """Everything `tenant` has in the traffic store in `directory` (`preft-rl serve --record DIR`) as training rows:
    each served response with feedback (staleness counted from the newest adapter version recorded) and each recorded
    prompt, once (`Tenant(name, reward_funcs=..., traffic=DIR)`)."""
    from .store import SqliteTrafficStore

    store = SqliteTrafficStore(directory)
    try:
        records = store.read(tenant)
        if not records:
            raise ValueError(f"tenant {tenant!r} has no traffic recorded in {store.path}; record it with `preft-rl serve "
                             "--tenant-keys FILE --record DIR` and record: true in the tenant's entry")
        reader = TrafficReader(store, tenant, seed=seed, max_age_s=max_age_s, max_staleness=max_staleness)
        return traffic_dataset(reader, prompts=len(records), served=len(records),
                               current_version=max(r.version for r in records))
    finally:
        store.close()
