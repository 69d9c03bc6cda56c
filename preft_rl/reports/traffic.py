"""How many records per second one traffic store takes (`preft-rl bench traffic-store`).

    preft-rl bench traffic-store --records 20000 --writers 1,32 --out docs/benchmarks/traffic-cpu

Each writer appends records shaped like a served request (prompt, sampled ids and log-probs of the given lengths)
and waits for each commit before the next, as the server does (a request's last chunk waits for its record). One
writer measures a commit per record; many writers measure the writer thread's group commits. Reported: records/s,
the p50 / p99 wait for a commit, and the store's size per record.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import check_at_least, start_report


@dataclass
class TrafficStoreBenchConfig:
    records: int = 20_000
    writers: list[int] = field(default_factory=lambda: [1, 32])
    prompt_len: int = 128
    gen_len: int = 128
    synchronous: str = "NORMAL"
    out: str = "outputs/bench-traffic-store"

    def __post_init__(self) -> None:
        check_at_least(self, 1, ("records", "prompt_len", "gen_len"))
        if not self.writers or min(self.writers) < 1:
            raise ValueError(f"--writers {self.writers}: give counts >= 1, e.g. 1,32")


def _one(cfg: TrafficStoreBenchConfig, writers: int, directory: Path) -> dict[str, Any]:
    from preft_rl.traffic import SqliteTrafficStore, TrafficRecord

    store = SqliteTrafficStore(directory, synchronous=cfg.synchronous)
    per_writer = max(1, cfg.records // writers)
    waits: list[list[float]] = [[] for _ in range(writers)]

    def writer(w: int) -> None:
        for i in range(per_writer):
            record = TrafficRecord(id=f"cmpl-{w}-{i}", choice=0, tenant=f"t{w % 8}", time=time.time(), adapter=f"t{w % 8}",
                                   version=1, prompt_ids=list(range(1000, 1000 + cfg.prompt_len)),
                                   completion_ids=list(range(2000, 2000 + cfg.gen_len)),
                                   logprobs=[-1.2345678 - k / 7 for k in range(cfg.gen_len)], finish_reason="length",
                                   messages=[{"role": "user", "content": "x" * 200}])
            start = time.perf_counter()
            store.append(record).result()
            waits[w].append(time.perf_counter() - start)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    store.close()
    flat = sorted(x for w in waits for x in w)
    size = sum(f.stat().st_size for f in directory.iterdir())
    return {"writers": writers, "records": len(flat), "seconds": seconds, "records_s": len(flat) / seconds,
            "commit_wait_p50_ms": 1e3 * statistics.median(flat), "commit_wait_p99_ms": 1e3 * flat[int(0.99 * (len(flat) - 1))],
            "bytes_per_record": size / len(flat)}


def run(cfg: TrafficStoreBenchConfig, progress: bool = True) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="preft-bench-traffic-", dir=os.environ.get("TMPDIR")) as tmp:
        for writers in cfg.writers:
            runs.append(_one(cfg, writers, Path(tmp) / f"w{writers}"))
            if progress:
                r = runs[-1]
                print(f"{writers:4d} writers: {r['records_s']:9.0f} records/s, commit wait p50 {r['commit_wait_p50_ms']:.2f} ms "
                      f"p99 {r['commit_wait_p99_ms']:.2f} ms", flush=True)
    return {"config": asdict(cfg), "runs": runs}


def write_report(result: dict[str, Any], out: str | Path, command: str) -> dict[str, Path]:
    paths = start_report(out, "traffic-store", result, command)
    cfg = result["config"]
    lines = ["# Traffic store throughput (SQLite, WAL)", "", f"Command: `{command}`", "",
             f"Records of {cfg['prompt_len']} prompt ids, {cfg['gen_len']} sampled ids and log-probs and one chat "
             f"message; synchronous={cfg['synchronous']}; each writer waits for its record's commit before the next.", "",
             "| writers | records | records/s | commit wait p50 ms | commit wait p99 ms | bytes per record |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        lines.append(f"| {r['writers']} | {r['records']} | {r['records_s']:.0f} | {r['commit_wait_p50_ms']:.2f} | "
                     f"{r['commit_wait_p99_ms']:.2f} | {r['bytes_per_record']:.0f} |")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths
