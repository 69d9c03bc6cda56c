"""The traffic store: what `preft-rl serve --record DIR` keeps of each tenant's served requests, and their feedback.

One record per served choice: the response id the client saw and the choice's index, the tenant, the time, the
adapter and its version, the prompt's token ids (and its chat messages, for a chat request, with the spans of the
prompt that earlier assistant turns fill: the server kept them plain, DESIGN invariant 9), the sampled token ids
with their processed log-probs, and the finish reason. Each record gets a sequence number (`seq`), increasing in the
order records were committed: a reader's position in a tenant's log. Feedback is one reward per (id, choice). Ids are
unique per tenant: a client may choose its request ids (vLLM's X-Request-Id), so one tenant can never take or reach
another's.

`TrafficStore` is the interface the server and the trainer use; `SqliteTrafficStore` implements it with SQLite in
WAL mode, which gives atomic appends and concurrent readers (other processes) without file locking of our own. A
shared store for several servers (Postgres) would implement the same few methods.

Durability. A record is committed before its response's last chunk reaches the client (the server awaits `append`),
so a server killed with SIGKILL loses only requests in flight; WAL with synchronous=NORMAL survives a killed process
(not a lost machine: pass `synchronous="FULL"` for that). Appends from many requests are grouped into one transaction
by a writer thread, so the event loop never waits on the disk and one commit serves many requests.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    choice INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    time REAL NOT NULL,
    adapter TEXT NOT NULL,
    version INTEGER NOT NULL,
    prompt_ids TEXT NOT NULL,
    messages TEXT,
    sampled_spans TEXT NOT NULL,
    completion_ids TEXT NOT NULL,
    logprobs TEXT NOT NULL,
    finish_reason TEXT,
    UNIQUE (tenant, id, choice)
);
CREATE INDEX IF NOT EXISTS records_by_tenant ON records (tenant, seq);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    choice INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    reward REAL NOT NULL,
    time REAL NOT NULL,
    UNIQUE (tenant, id, choice)
);
"""


@dataclasses.dataclass(frozen=True)
class TrafficRecord:
    """One served choice (see the module docstring); `seq` is set by the store."""

    id: str
    choice: int
    tenant: str
    time: float
    adapter: str
    version: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None
    messages: list[dict[str, Any]] | None = None
    sampled_spans: list[list[int]] = dataclasses.field(default_factory=list)  # [start, end) of prompt_ids: earlier turns
    seq: int | None = None

    def __post_init__(self) -> None:
        from preft_rl.adapters.masks import check_sampled_spans

        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(f"record {self.id!r} choice {self.choice}: {len(self.logprobs)} log-probs for "
                             f"{len(self.completion_ids)} sampled tokens; record one log-prob per sampled token")
        try:
            check_sampled_spans(self.sampled_spans, len(self.prompt_ids))
        except ValueError as exc:
            raise ValueError(f"record {self.id!r} choice {self.choice}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class FeedbackRow:
    """Feedback on one recorded response: its own seq (in the order feedback arrived), the record, the reward."""

    seq: int
    record: TrafficRecord
    reward: float
    time: float


class FeedbackError(Exception):
    """Refused feedback, with its HTTP status (404 unknown or another tenant's response, 409 already given)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class TrafficStore(Protocol):
    def append(self, record: TrafficRecord) -> concurrent.futures.Future[int]: ...
    def read(self, tenant: str, after: int = 0, limit: int | None = None) -> list[TrafficRecord]: ...
    def add_feedback(self, tenant: str, id: str, choice: int, reward: float) -> None: ...
    def feedback(self, tenant: str, ids: list[tuple[str, int]]) -> dict[tuple[str, int], float]: ...
    def read_feedback(self, tenant: str, after: int = 0, limit: int | None = None) -> list[FeedbackRow]: ...
    def read_seqs(self, tenant: str, seqs: list[int]) -> list[TrafficRecord]: ...
    def read_feedback_seqs(self, tenant: str, seqs: list[int]) -> list[FeedbackRow]: ...
    def prune(self, max_age_s: float | None = None, max_records: int | None = None) -> int: ...
    def close(self) -> None: ...


def _row_to_record(row: sqlite3.Row) -> TrafficRecord:
    return TrafficRecord(id=row["id"], choice=row["choice"], tenant=row["tenant"], time=row["time"],
                         adapter=row["adapter"], version=row["version"], prompt_ids=json.loads(row["prompt_ids"]),
                         completion_ids=json.loads(row["completion_ids"]), logprobs=json.loads(row["logprobs"]),
                         finish_reason=row["finish_reason"],
                         messages=json.loads(row["messages"]) if row["messages"] is not None else None,
                         sampled_spans=json.loads(row["sampled_spans"]), seq=row["seq"])


class SqliteTrafficStore:
    """`TrafficStore` in one SQLite file (`DIR/traffic.sqlite`), WAL mode; one writer thread, any number of readers.

    `max_age_s` / `max_records` (per tenant) bound its size: the writer prunes older records (and their feedback)
    every `prune_every` commits."""

    FILE = "traffic.sqlite"

    def __init__(self, directory: str | Path, *, max_age_s: float | None = None, max_records: int | None = None,
                 prune_every: int = 256, synchronous: str = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous={synchronous!r}: use 'NORMAL' (survives a killed process) or 'FULL' "
                             "(survives a lost machine)")
        for name, value in (("max_age_s", max_age_s), ("max_records", max_records)):
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0 (or None: no bound)")
        self.path = Path(directory) / self.FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_age_s, self.max_records, self.prune_every = max_age_s, max_records, prune_every
        self._synchronous = synchronous
        with self._connect() as db:
            db.executescript(SCHEMA)
        self._queue: queue.Queue[tuple[TrafficRecord, concurrent.futures.Future[int]] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="preft-traffic-writer", daemon=True)
        self._writer.start()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        return db

    # ------------------------------------------------------------------------------ writing
    def append(self, record: TrafficRecord) -> concurrent.futures.Future[int]:
        """Queue `record`; the future gives its seq once it is committed (or the error that refused it)."""
        if self._closed:
            raise RuntimeError("the traffic store is closed")
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue.put((record, future))
        return future

    def _write_loop(self) -> None:
        db = self._connect()
        commits = 0
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < 1024:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(more)
            self._commit(db, batch)
            commits += 1
            if (self.max_age_s or self.max_records) and commits % self.prune_every == 0:
                self._prune(db, self.max_age_s, self.max_records)
        db.close()

    def _commit(self, db: sqlite3.Connection, batch: list[tuple[TrafficRecord, concurrent.futures.Future[int]]]) -> None:
        """One transaction for the batch; a record refused alone (a duplicate id) fails only its own future."""
        done: list[tuple[concurrent.futures.Future[int], int | BaseException]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for record, future in batch:
                try:
                    cursor = db.execute(
                        "INSERT INTO records (id, choice, tenant, time, adapter, version, prompt_ids, messages, "
                        "sampled_spans, completion_ids, logprobs, finish_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (record.id, record.choice, record.tenant, record.time, record.adapter, record.version,
                         json.dumps(record.prompt_ids),
                         None if record.messages is None else json.dumps(record.messages, default=str),
                         json.dumps(record.sampled_spans),
                         json.dumps(record.completion_ids), json.dumps(record.logprobs), record.finish_reason))
                    done.append((future, cursor.lastrowid))
                except sqlite3.IntegrityError as exc:
                    done.append((future, ValueError(f"record {record.id!r} choice {record.choice} is already stored "
                                                    f"({exc})")))
            db.execute("COMMIT")
        except BaseException as exc:  # the disk failed: every record of the batch is lost, and says so
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            done = [(future, exc) for _, future in batch]
        for future, outcome in done:
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def add_feedback(self, tenant: str, id: str, choice: int, reward: float) -> None:
        """Store `reward` for a response of `tenant`: 404 if no such response is recorded for this tenant (another
        tenant's reads the same as none), 409 if it already has feedback. Nothing changes on a refusal."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                found = db.execute("SELECT 1 FROM records WHERE tenant = ? AND id = ? AND choice = ?",
                                   (tenant, id, choice)).fetchone()
                if found is None:
                    raise FeedbackError(404, f"no recorded response {id!r} (choice {choice}) for this key: feedback "
                                             "goes to a response of one of your adapters, by its id, from a server "
                                             "recording your traffic")
                if db.execute("SELECT 1 FROM feedback WHERE tenant = ? AND id = ? AND choice = ?",
                              (tenant, id, choice)).fetchone():
                    raise FeedbackError(409, f"response {id!r} (choice {choice}) already has feedback; each response "
                                             "takes one")
                db.execute("INSERT INTO feedback (id, choice, tenant, reward, time) VALUES (?, ?, ?, ?, ?)",
                           (id, choice, tenant, float(reward), time.time()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------------------ reading
    def read(self, tenant: str, after: int = 0, limit: int | None = None) -> list[TrafficRecord]:
        """`tenant`'s records with seq > `after`, oldest first (at most `limit`)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM records WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?",
                              (tenant, after, -1 if limit is None else limit)).fetchall()
        return [_row_to_record(row) for row in rows]

    def feedback(self, tenant: str, ids: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
        """The rewards given for these (id, choice) pairs of `tenant`'s responses."""
        with self._connect() as db:
            rows = db.execute("SELECT id, choice, reward FROM feedback WHERE tenant = ?", (tenant,)).fetchall()
        wanted = set(ids)
        return {(r["id"], r["choice"]): r["reward"] for r in rows if (r["id"], r["choice"]) in wanted}

    def read_feedback(self, tenant: str, after: int = 0, limit: int | None = None) -> list[FeedbackRow]:
        """`tenant`'s feedback with seq > `after` in the order it arrived (at most `limit`), each with its record."""
        return self._feedback_rows("f.seq > ? ORDER BY f.seq LIMIT ?", (tenant, after, -1 if limit is None else limit))

    def read_seqs(self, tenant: str, seqs: list[int]) -> list[TrafficRecord]:
        """`tenant`'s records with these seqs (those still stored), in seq order."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM records WHERE tenant = ? AND seq IN (SELECT value FROM json_each(?)) "
                              "ORDER BY seq", (tenant, json.dumps(list(seqs)))).fetchall()
        return [_row_to_record(row) for row in rows]

    def read_feedback_seqs(self, tenant: str, seqs: list[int]) -> list[FeedbackRow]:
        """`tenant`'s feedback rows with these seqs (those still stored), in seq order."""
        return self._feedback_rows("f.seq IN (SELECT value FROM json_each(?)) ORDER BY f.seq",
                                   (tenant, json.dumps(list(seqs))))

    def _feedback_rows(self, condition: str, params: tuple) -> list[FeedbackRow]:
        """A tenant's feedback rows joined with their records; `condition` follows "WHERE f.tenant = ? AND"."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT f.seq AS fseq, f.reward AS freward, f.time AS ftime, r.* FROM feedback f JOIN records r ON "
                "r.tenant = f.tenant AND r.id = f.id AND r.choice = f.choice WHERE f.tenant = ? AND " + condition,
                params).fetchall()
        return [FeedbackRow(seq=row["fseq"], record=_row_to_record(row), reward=row["freward"], time=row["ftime"])
                for row in rows]

    def tenants(self) -> list[str]:
        with self._connect() as db:
            return [r["tenant"] for r in db.execute("SELECT DISTINCT tenant FROM records ORDER BY tenant")]

    def iter_all(self) -> Iterator[TrafficRecord]:
        with self._connect() as db:
            for row in db.execute("SELECT * FROM records ORDER BY seq"):
                yield _row_to_record(row)

    # ------------------------------------------------------------------------------ size
    def prune(self, max_age_s: float | None = None, max_records: int | None = None) -> int:
        """Delete records older than `max_age_s` and beyond each tenant's newest `max_records` (and their feedback);
        the number of records deleted."""
        with self._connect() as db:
            return self._prune(db, max_age_s, max_records)

    @staticmethod
    def _prune(db: sqlite3.Connection, max_age_s: float | None, max_records: int | None) -> int:
        db.execute("BEGIN IMMEDIATE")
        deleted = 0
        if max_age_s is not None:
            deleted += db.execute("DELETE FROM records WHERE time < ?", (time.time() - max_age_s,)).rowcount
        if max_records is not None:
            deleted += db.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() OVER "
                "(PARTITION BY tenant ORDER BY seq DESC) AS newer FROM records) WHERE newer > ?)", (max_records,)).rowcount
        db.execute("DELETE FROM feedback WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.tenant = feedback.tenant "
                   "AND r.id = feedback.id AND r.choice = feedback.choice)")
        db.execute("COMMIT")
        return deleted

    def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._writer.join()
