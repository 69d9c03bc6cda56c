"""Many adapters on few slots: `preft-rl serve --adapter-dir` against vLLM's LoRA serving with a resolver, each against
itself with every adapter the traffic uses resident.

    preft-rl bench adapter-cache --adapters 10000 --slots 64 --cpu-adapters 512 --requests 400 --clients 16 \\
        --out docs/benchmarks/many-adapters-cpu

--adapters random LoRA adapters (rank --rank on --target-modules, small so that 10,000 fit on disk) are written twice:
as preft-rl adapter folders and as PEFT LoRA folders. The traffic: --requests requests whose adapters follow a Zipf
law (exponent --zipf) over the adapters, --prompt-len random prompt tokens, exactly --gen-len greedy output tokens,
from --clients concurrent streaming clients (each sends its next request when its last one ends). Servers, each started
alone, warmed with requests to the base model, driven with the same traffic, then stopped:
  preft             `preft-rl serve --adapter-dir DIR --max-adapters SLOTS --max-cpu-adapters CPU`: an adapter is
                    loaded from disk on its first request, and unloaded (least recently used) when CPU are held;
  preft-resident    the same server holding every adapter the traffic uses (as many slots), each loaded before timing;
  vllm-lora         `vllm serve --enable-lora --max-loras SLOTS --max-cpu-loras CPU` with vLLM's filesystem LoRA resolver
                    over the PEFT folders (VLLM_LORA_RESOLVER_CACHE_DIR): vLLM's way of serving adapters from disk;
  vllm-lora-resident  the same with --max-loras and --max-cpu-loras set to the adapters the traffic uses, each loaded
                    before timing.
Reported per server: requests/s and output tokens/s (and each cache server against its resident twin), the time to
first token (TTFT) at p50 / p99 of the requests that are an adapter's first in the traffic (misses: its files must be
read) and of the others, and for preft-rl its cache counters (GET /v1/preft/cache): loads from the directory,
unloads, and slot misses.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import check_at_least, start_report
from .serve import Server, percentile

SERVERS = ("preft", "preft-resident", "vllm-lora", "vllm-lora-resident")


@dataclass
class AdapterCacheBenchConfig:
    model: str = "smollm2-135m-instruct"
    adapters: int = 10_000
    slots: int = 64
    cpu_adapters: int = 512
    requests: int = 400
    clients: int = 16
    zipf: float = 1.0
    rank: int = 1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    prompt_len: int = 32
    gen_len: int = 8
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    seed: int = 0
    out: str = "outputs/bench-adapter-cache"
    startup_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        unknown = set(self.servers) - set(SERVERS)
        if unknown or not self.servers:
            raise ValueError(f"--servers {sorted(unknown) or self.servers}: choose from {list(SERVERS)}")
        check_at_least(self, 1, ("adapters", "slots", "cpu_adapters", "requests", "clients", "rank", "prompt_len", "gen_len"))
        if self.cpu_adapters < self.slots:
            raise ValueError(f"--cpu-adapters {self.cpu_adapters} must be >= --slots {self.slots} (the slots' adapters "
                             "count among those held, as in vLLM's --max-cpu-loras)")
        if self.zipf <= 0:
            raise ValueError(f"--zipf {self.zipf}: the exponent must be > 0 (1.0: the k-th most used adapter gets 1/k)")


def adapter_name(i: int) -> str:
    return f"user-{i:05d}"


def zipf_traffic(cfg: AdapterCacheBenchConfig) -> list[str]:
    """The adapter of each request: popularity rank k has probability proportional to 1 / k^zipf; which adapter has
    which rank is a seeded permutation (names carry no order)."""
    rng = np.random.default_rng(cfg.seed)
    weights = 1.0 / np.arange(1, cfg.adapters + 1) ** cfg.zipf
    ranks = rng.choice(cfg.adapters, size=cfg.requests, p=weights / weights.sum())
    owner = rng.permutation(cfg.adapters)
    return [adapter_name(int(owner[k])) for k in ranks]


# ------------------------------------------------------------------------------------------ adapters on disk
def write_adapters(cfg: AdapterCacheBenchConfig, model_path: str, root: Path, progress: bool = True) -> dict[str, Path]:
    """--adapters random LoRAs, each written as a preft-rl adapter folder (root/preft/NAME) and as a PEFT LoRA folder
    naming the base model's path (root/peft/NAME, what vLLM's filesystem resolver accepts)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from preft_rl.adapters import PreftConfig, get_preft_model
    from preft_rl.adapters.serialization import load_adapter_state_dict
    from preft_rl.engine.baselines import write_peft_lora

    from .rollout import random_adapter_states

    config = PreftConfig(method="lora", r=cfg.rank, target_modules=list(cfg.target_modules))
    model = get_preft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), config)
    dirs = {"preft": root / "preft", "peft": root / "peft"}
    states = random_adapter_states(model_path, config, (cfg.seed * 1_000_003 + i for i in range(cfg.adapters)))
    for i, state in enumerate(tqdm(states, total=cfg.adapters, desc="writing adapters", disable=not progress, mininterval=5)):
        load_adapter_state_dict(model, state)
        model.save_pretrained(dirs["preft"] / adapter_name(i))
        peft = write_peft_lora(state, config, dirs["peft"] / adapter_name(i))
        peft_config = json.loads((peft / "adapter_config.json").read_text())
        # vLLM's filesystem resolver takes a folder whose base model is the served model's path (model_config.model)
        (peft / "adapter_config.json").write_text(json.dumps({**peft_config, "base_model_name_or_path": model_path}))
    return dirs


def _commands(cfg: AdapterCacheBenchConfig, path: str, dirs: dict[str, Path], dtype: str, distinct: int) -> dict[str, tuple[list[str], dict]]:
    from preft_rl.engine.baselines import _VLLM_RANKS

    common = ["--host", "127.0.0.1", "--dtype", dtype, "--enforce-eager", "--no-enable-prefix-caching", "--seed", str(cfg.seed),
              "--max-model-len", str(cfg.prompt_len + cfg.gen_len + 8), "--max-num-seqs", str(cfg.max_num_seqs),
              "--max-num-batched-tokens", str(cfg.max_num_batched_tokens), "--served-model-name", "base",
              "--disable-uvicorn-access-log"]
    preft = lambda slots, held: [sys.executable, "-m", "preft_rl.cli", "serve", path, "--method", "lora",  # noqa: E731
                                 "--max-rank", str(cfg.rank), "--max-adapters", str(slots), "--max-cpu-adapters", str(held),
                                 "--adapter-dir", str(dirs["preft"])] + common
    vllm_rank = next(r for r in _VLLM_RANKS if r >= cfg.rank)
    vllm = lambda slots, held: [sys.executable, "-m", "preft_rl.engine.server.launch", "serve", path, "--enable-lora",  # noqa: E731
                                "--max-loras", str(slots), "--max-cpu-loras", str(held), "--max-lora-rank", str(vllm_rank)] + common
    resolver = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_LORA_RESOLVER_CACHE_DIR": str(dirs["peft"])}
    return {
        "preft": (preft(cfg.slots, cfg.cpu_adapters), {}),
        "preft-resident": (preft(distinct, distinct), {}),
        "vllm-lora": (vllm(cfg.slots, cfg.cpu_adapters), resolver),
        "vllm-lora-resident": (vllm(distinct, distinct), resolver),
    }


# ------------------------------------------------------------------------------------------ load
async def drive(url: str, cfg: AdapterCacheBenchConfig, prompts: list[list[int]], models: list[str],
                gen_len: int) -> tuple[list[dict[str, Any]], float]:
    """Every request through `clients` concurrent streaming clients, each taking the next request when its last one
    ended. Per request: TTFT, end-to-end seconds, output tokens, and whether it is its adapter's first in the list."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=1800)
    seen: set[str] = set()
    first = []
    for model in models:
        first.append(model not in seen)
        seen.add(model)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(models)):
        queue.put_nowait(i)
    results: list[dict[str, Any] | None] = [None] * len(models)

    async def one(i: int) -> dict[str, Any]:
        sent = time.perf_counter()
        first_token = None
        tokens = 0
        stream = await client.completions.create(
            model=models[i], prompt=prompts[i], max_tokens=gen_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "min_tokens": gen_len})
        async for chunk in stream:
            if chunk.choices and first_token is None:  # the first token's chunk (its text may be empty: part of a character)
                first_token = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if first_token is None or tokens != gen_len:
            raise RuntimeError(f"a request to {models[i]} returned {tokens} tokens, expected {gen_len}")
        return {"ttft_s": first_token - sent, "seconds": time.perf_counter() - sent, "tokens": tokens, "first": first[i]}

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(cfg.clients)))
    seconds = time.perf_counter() - start
    await client.close()
    return [r for r in results if r is not None], seconds


def summarize_run(server: str, timings: list[dict[str, Any]], seconds: float, stats: dict[str, Any] | None) -> dict[str, Any]:
    cold = [t["ttft_s"] for t in timings if t["first"]]
    warm = [t["ttft_s"] for t in timings if not t["first"]]
    ms = lambda values, q: 1e3 * percentile(values, q) if values else None  # noqa: E731
    return {"server": server, "requests": len(timings), "seconds": seconds, "requests_s": len(timings) / seconds,
            "output_tok_s": sum(t["tokens"] for t in timings) / seconds,
            "first_requests": len(cold), "ttft_first_p50_ms": ms(cold, 50), "ttft_first_p99_ms": ms(cold, 99),
            "ttft_repeat_p50_ms": ms(warm, 50), "ttft_repeat_p99_ms": ms(warm, 99),
            "ttft_p50_ms": ms([t["ttft_s"] for t in timings], 50), "cache": stats}


def _cache_stats(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/v1/preft/cache", timeout=30) as response:
            return json.loads(response.read())
    except OSError:
        return None


def run(cfg: AdapterCacheBenchConfig, progress: bool = True) -> dict[str, Any]:
    from transformers import AutoConfig

    from preft_rl.engine.common import default_vllm_settings
    from preft_rl.models import resolve_model

    path = resolve_model(cfg.model)
    hf_config = AutoConfig.from_pretrained(path)
    dtype = default_vllm_settings(hf_config)["dtype"]
    models = zipf_traffic(cfg)
    distinct = sorted(set(models))
    rng = np.random.default_rng(cfg.seed + 1)
    prompts = [rng.integers(100, hf_config.vocab_size - 100, size=cfg.prompt_len).tolist() for _ in models]
    warm_prompts = [rng.integers(100, hf_config.vocab_size - 100, size=cfg.prompt_len).tolist() for _ in range(2 * cfg.clients)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="preft-bench-adapter-cache-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        dirs = write_adapters(cfg, path, root, progress)
        write_s = time.perf_counter() - started
        disk = {kind: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for kind, d in dirs.items()}
        commands = _commands(cfg, path, dirs, dtype, len(distinct))
        for name in cfg.servers:
            command, env = commands[name]
            if progress:
                print(f"starting {name} ...", flush=True)
            server = Server(name, command, root / f"{name}.log", env=env)
            try:
                server.wait_ready(cfg.startup_timeout_s)
                asyncio.run(drive(server.url, cfg, warm_prompts, ["base"] * len(warm_prompts), cfg.gen_len))
                if name.endswith("-resident"):  # every adapter of the traffic loaded (and in a slot) before timing
                    asyncio.run(drive(server.url, cfg, prompts[: len(distinct)], distinct, 1))
                before = _cache_stats(server.url)
                timings, seconds = asyncio.run(drive(server.url, cfg, prompts, models, cfg.gen_len))
                after = _cache_stats(server.url)
                stats = None if after is None else {**after, **{f"{k}_during": after[k] - (before or {}).get(k, 0)
                                                                for k in ("dir_loads", "dir_unloads", "slot_loads")}}
                runs.append(summarize_run(name, timings, seconds, stats))
            except Exception as exc:  # recorded; the other servers still run
                runs.append({"server": name, "failed": f"{type(exc).__name__}: {exc}"[:2000], "log": server.log.read_text()[-3000:]})
            finally:
                server.close()
            if progress:
                r = runs[-1]
                print(f"{name}: " + (f"FAILED {r['failed'][:300]}" if "failed" in r else
                                     f"{r['output_tok_s']:.1f} output tok/s, TTFT p50 first {r['ttft_first_p50_ms']:.0f} ms / "
                                     f"repeat {r['ttft_repeat_p50_ms'] or float('nan'):.0f} ms"), flush=True)
    by_server = {r["server"]: r for r in runs if "failed" not in r}
    for r in runs:
        twin = by_server.get(r["server"] + "-resident")
        if "failed" not in r and twin is not None:
            r["vs_resident"] = r["output_tok_s"] / twin["output_tok_s"]
        if r["server"] == "preft" and "vllm-lora" in by_server and "failed" not in r:
            r["vs_vllm_lora"] = r["output_tok_s"] / by_server["vllm-lora"]["output_tok_s"]
    return {"config": asdict(cfg), "distinct_adapters": len(distinct), "write_s": write_s, "disk_bytes": disk, "runs": runs}


def write_report(result: dict[str, Any], out: str | Path, command: str, predictions: list[str] | None = None) -> dict[str, Path]:
    paths = start_report(out, "adapter-cache", result, command)
    cfg = result["config"]
    fmt = lambda v, spec=".0f": "" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "# Many adapters on few slots: serving from disk", "", f"Command: `{command}`", "",
        f"{cfg['adapters']} LoRA adapters (r={cfg['rank']} on {', '.join(cfg['target_modules'])}) on disk "
        f"({result['disk_bytes']['preft'] / 2**30:.2f} GiB as preft-rl folders, {result['disk_bytes']['peft'] / 2**30:.2f} GiB "
        f"as PEFT folders; written in {result['write_s']:.0f} s). {cfg['requests']} requests, Zipf exponent {cfg['zipf']}: "
        f"{result['distinct_adapters']} distinct adapters; {cfg['clients']} concurrent streaming clients, "
        f"{cfg['prompt_len']} random prompt tokens -> {cfg['gen_len']} greedy tokens; {cfg['slots']} slots, "
        f"{cfg['cpu_adapters']} held in host memory. 'first': a request that is its adapter's first in the traffic "
        "(a miss: the files must be read); 'repeat': the others.", "",
        "| server | req/s | output tok/s | vs resident | vs vLLM LoRA | TTFT p50 first ms | TTFT p99 first ms "
        "| TTFT p50 repeat ms | TTFT p99 repeat ms | disk loads | unloads | slot misses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        if "failed" in r:
            lines.append(f"| {r['server']} | failed: {r['failed'][:200]} |  |  |  |  |  |  |  |  |  |  |")
            continue
        cache = r.get("cache") or {}
        lines.append(
            f"| {r['server']} | {r['requests_s']:.2f} | {r['output_tok_s']:.1f} | {fmt(r.get('vs_resident'), '.2f')} | "
            f"{fmt(r.get('vs_vllm_lora'), '.2f')} | {fmt(r['ttft_first_p50_ms'])} | {fmt(r['ttft_first_p99_ms'])} | "
            f"{fmt(r['ttft_repeat_p50_ms'])} | {fmt(r['ttft_repeat_p99_ms'])} | {fmt(cache.get('dir_loads_during'))} | "
            f"{fmt(cache.get('dir_unloads_during'))} | {fmt(cache.get('slot_loads_during'))} |")
    if predictions:
        lines += ["", "## Predictions (written before the run)", "", *predictions]
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths
