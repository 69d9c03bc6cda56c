"""Rollout-throughput benchmark: PreFT vs all-token multi-LoRA vs the base model, by number of adapters.

    preft-rl bench rollout --model smollm2-135m-instruct --adapters 1,8,64 --methods lora,loreft \\
        --rank 16 --prompts 64 --prompt-len 64 --gen-len 64 --repeats 3 --out docs/benchmarks/rollout-cpu
    preft-rl bench rollout --adapters 8 --methods lora --prompts 8,64,256 --no-all-token --no-ours-all-token  # batch sweep

One process, one run: the same request set (random prompt tokens, requests assigned to adapters
round-robin, greedy, exactly gen-len tokens each) goes through
  base              the base model in plain vLLM (BaseEngine),
  preft-<method>    PreftEngine with N prefill-only adapters,
  lora-all-token    vLLM's native multi-LoRA with the same N adapters (NativeLoraEngine),
  all-<method>      PreftEngine(adapter_scope="all"): our own engine with the same adapters on every token. PreFT
                    against it isolates the paper's idea (skip the adapter at decode) from how fast vLLM's CPU LoRA
                    kernels are,
all with identical vLLM settings (eager, prefix caching off, same batch limits). `--prompts` may list several
request counts (a batch-size sweep: every count runs as its own point, all requests at once by default); beside the
whole run's output tokens/s the report gives pure-decode tokens/s (tokens computed in steps without prompt work, over
those steps' time), the number that shows an engine's per-step overhead at small batch. Configurations
alternate within each repeat; the report gives medians and the min-max spread. Adapters are random
(rank --rank; LoRA on all linear layers; ReFT on every layer at every prompt token, the costliest case).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from . import start_report


@dataclass
class RolloutBenchConfig:
    model: str = "smollm2-135m-instruct"
    adapters: list[int] = field(default_factory=lambda: [1, 8, 64, 512])
    methods: list[str] = field(default_factory=lambda: ["lora", "loreft"])
    rank: int = 16
    prompts: list[int] = field(default_factory=lambda: [64])  # requests per run; several counts = a batch sweep
    prompt_len: int = 64
    gen_len: int = 64
    repeats: int = 3
    out: str = "outputs/bench-rollout"
    seed: int = 0
    max_num_seqs: int | None = None  # None: the largest --prompts, so every request of a point runs at once
    max_num_batched_tokens: int = 4096
    all_token: bool = True  # also run vLLM's native all-token multi-LoRA (the baseline users pick today)
    ours_all_token: bool = True  # also run our engine with the adapters on every token (all-<method>)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.prompts, int):
            self.prompts = [self.prompts]
        if not self.prompts or min(self.prompts) < 1:
            raise ValueError(f"--prompts {self.prompts}: give positive request counts, e.g. 8,64,256")
        if self.max_num_seqs is None:
            self.max_num_seqs = max(self.prompts)
        if not self.adapters or min(self.adapters) < 1:
            raise ValueError(f"--adapters {self.adapters}: give positive counts, e.g. 1,8,64")
        from preft_rl.adapters.methods import method_names

        unknown = set(self.methods) - set(method_names())
        if unknown:
            raise ValueError(f"--methods {sorted(unknown)}: use some of {method_names()}")
        if self.repeats < 1 or self.prompt_len < 1 or self.gen_len < 1 or self.max_num_seqs < 1:
            raise ValueError("--repeats, --prompt-len, --gen-len and --max-num-seqs must be >= 1")


@dataclass
class Measurement:
    config: str  # base | preft-lora | preft-loreft | lora-all-token
    adapters: int
    seconds: float
    output_tokens: int
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    prefill_steps: int
    decode_steps: int
    sequences: int = 0  # requests in the run (the batch-sweep point)
    decode_tokens: int = 0  # tokens computed in pure-decode steps


def random_adapter_states(model_path: str, config, seeds: Iterable[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Random adapters of `config` on the model at `model_path`, one per seed, in the file format, made one at a time
    (512 full-size LoRAs would not fit in memory together). Every adapter parameter is drawn N(0, 0.02^2): outputs
    stay finite and plausible; LoReFT's R stays orthonormal (it is computed from its free parameter)."""
    from transformers import AutoModelForCausalLM

    from preft_rl.adapters import get_preft_model

    model = get_preft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), config)
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in model.adapter_named_parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        yield {key: tensor.clone() for key, tensor in model.adapter_state_dict().items()}


def bench_engines(cfg: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The benchmark systems with `cfg.adapters` random adapters each (cfg: a rollout or agent benchmark config)."""
    from preft_rl.adapters.config import PreftConfig
    from preft_rl.engine import PreftEngine
    from preft_rl.engine.baselines import BaseEngine, NativeLoraEngine
    from preft_rl.models import resolve_model

    path = resolve_model(cfg.model)
    most = max(cfg.adapters)
    engines: dict[str, Any] = {"base": BaseEngine(path, **settings)}
    scopes = {"preft": "prompt", **({"all": "all"} if cfg.ours_all_token else {})}
    for method in cfg.methods:
        for label, scope in scopes.items():
            engine = PreftEngine(path, max_adapters=most, max_rank=cfg.rank, method=method, adapter_scope=scope, **settings)
            config = PreftConfig(method=method, r=cfg.rank, adapter_scope=scope)
            for i, state in enumerate(random_adapter_states(path, config, range(cfg.seed, cfg.seed + most))):
                engine.add_adapter(f"a{i}", state, config=config)
            engines[f"{label}-{method}"] = engine
    if cfg.all_token:
        native = NativeLoraEngine(path, max_adapters=most, max_rank=cfg.rank, **settings)
        config = PreftConfig(method="lora", r=cfg.rank)
        for i, state in enumerate(random_adapter_states(path, config, range(cfg.seed, cfg.seed + most))):
            native.add_adapter(f"a{i}", state, config=config)
        engines["lora-all-token"] = native
    return engines


def run(cfg: RolloutBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run every configuration cfg.repeats times (alternating) and return the raw measurements and summary."""
    from preft_rl.engine import SamplingParams, vllm_compat

    settings = dict(enforce_eager=True, enable_prefix_caching=False, max_num_seqs=cfg.max_num_seqs,
                    max_num_batched_tokens=cfg.max_num_batched_tokens, seed=cfg.seed,
                    max_model_len=cfg.prompt_len + cfg.gen_len + 8)
    settings.update(cfg.engine_kwargs)
    engines = bench_engines(cfg, settings)
    timers = {name: vllm_compat.StepTimer(_runner(engine)) for name, engine in engines.items()}
    rng = np.random.default_rng(cfg.seed)
    vocab = len(engines["base"].tokenizer)
    all_prompts = [rng.integers(100, vocab - 100, size=cfg.prompt_len).tolist() for _ in range(max(cfg.prompts))]
    params = SamplingParams(max_tokens=cfg.gen_len, min_tokens=cfg.gen_len, temperature=0.0, ignore_eos=True)
    runs = [(name, n, s) for s in cfg.prompts
            for name, n in [("base", 0)] + [(name, n) for n in cfg.adapters for name in engines if name != "base"]]
    warm_params = SamplingParams(max_tokens=2, min_tokens=2, temperature=0.0, ignore_eos=True)
    warmed: set[tuple[str, int, int]] = set()
    measurements: list[Measurement] = []
    for repeat in range(cfg.repeats):
        order = runs[repeat % len(runs):] + runs[: repeat % len(runs)]  # rotate, so no configuration always goes first
        for name, n, sequences in order:
            engine = engines[name]
            prompts = all_prompts[:sequences]
            adapters = None if n == 0 else [f"a{i % n}" for i in range(sequences)]
            if (name, n, sequences) not in warmed:  # the first full-size prefill of an engine pays one-off costs
                # (measured 2.8 s vs 1.5 s on the random Llama): warm every configuration at full size once
                engine.generate(prompts, warm_params, adapters=adapters, use_tqdm=False)
                warmed.add((name, n, sequences))
            engine.generate(prompts[:2], params, adapters=None if adapters is None else adapters[:2], use_tqdm=False)  # warm
            timers[name].reset()
            start = time.perf_counter()
            outs = engine.generate(prompts, params, adapters=adapters, use_tqdm=False)
            seconds = time.perf_counter() - start
            prefill_s, decode_s, prefill_steps, decode_steps, decode_tokens = timers[name].reset()
            output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            measurements.append(Measurement(name, n, seconds, output_tokens, sequences * cfg.prompt_len,
                                            prefill_s, decode_s, prefill_steps, decode_steps, sequences, decode_tokens))
            if progress:
                decode = f"{decode_tokens / decode_s:9.1f}" if decode_s else "      n/a"
                print(f"[{repeat + 1}/{cfg.repeats}] {name:15s} N={n:<4d} seqs={sequences:<4d} {output_tokens / seconds:9.1f} "
                      f"output tok/s, {decode} pure-decode tok/s", flush=True)
    for engine in engines.values():
        engine.close()
    return {"config": asdict(cfg), "measurements": [asdict(m) for m in measurements], "summary": summarize(measurements)}


def _runner(engine: Any) -> Any:
    from preft_rl.engine import vllm_compat

    return vllm_compat.model_runner(engine.llm)


def summarize(measurements: list[Measurement]) -> list[dict[str, Any]]:
    """Median and spread per (config, adapters, sequences), with ratios at the same number of sequences: to base, to
    vLLM's all-token LoRA at the same N, and (for preft-<method>) to our own engine with the same adapters on every
    token (all-<method>) at the same N. `decode_vs_base` compares pure-decode tokens/s with base's."""
    groups: dict[tuple[str, int, int], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.config, m.adapters, m.sequences), []).append(m)
    rows = []
    for (name, n, sequences), ms in groups.items():
        out_tps = [m.output_tokens / m.seconds for m in ms]
        decode_tps = [m.decode_tokens / m.decode_s for m in ms if m.decode_s > 0 and m.decode_tokens > 0]
        rows.append({
            "config": name, "adapters": n, "sequences": sequences, "runs": len(ms),
            "output_tok_s": statistics.median(out_tps), "output_tok_s_min": min(out_tps), "output_tok_s_max": max(out_tps),
            "total_tok_s": statistics.median((m.output_tokens + m.prompt_tokens) / m.seconds for m in ms),
            "decode_tok_s": statistics.median(decode_tps) if decode_tps else None,
            "prefill_s": statistics.median(m.prefill_s for m in ms), "decode_s": statistics.median(m.decode_s for m in ms),
            "seconds": statistics.median(m.seconds for m in ms),
        })
    base = {r["sequences"]: r for r in rows if r["config"] == "base"}
    native = {(r["adapters"], r["sequences"]): r["output_tok_s"] for r in rows if r["config"] == "lora-all-token"}
    by_key = {(r["config"], r["adapters"], r["sequences"]): r["output_tok_s"] for r in rows}
    for row in rows:
        ref = base.get(row["sequences"])
        row["vs_base"] = row["output_tok_s"] / ref["output_tok_s"] if ref else None
        row["decode_vs_base"] = (row["decode_tok_s"] / ref["decode_tok_s"]
                                 if ref and ref["decode_tok_s"] and row["decode_tok_s"] else None)
        key = (row["adapters"], row["sequences"])
        row["vs_lora_all_token"] = row["output_tok_s"] / native[key] if key in native else None
        ours = (by_key.get(("all-" + row["config"].removeprefix("preft-"), *key))
                if row["config"].startswith("preft-") else None)
        row["vs_ours_all_token"] = row["output_tok_s"] / ours if ours else None
    return sorted(rows, key=lambda r: (r["sequences"], r["adapters"], r["config"]))


def write_report(result: dict[str, Any], out: str | Path, command: str) -> dict[str, Path]:
    """JSON (everything), Markdown (the table) and a PNG (output tokens/s vs adapters) in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = start_report(out, "rollout", result, command, plot=True)
    cfg = result["config"]
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    prompts = cfg["prompts"] if isinstance(cfg["prompts"], list) else [cfg["prompts"]]
    lines = [
        "# Rollout throughput", "", f"Command: `{command}`", "",
        f"{', '.join(map(str, prompts))} requests x {cfg['prompt_len']} prompt tokens -> {cfg['gen_len']} generated tokens "
        f"each, rank {cfg['rank']}, greedy, eager, prefix caching off, max_num_seqs {cfg['max_num_seqs']}; median of "
        f"{cfg['repeats']} alternating runs (min-max in brackets). Pure decode: tokens of the steps without prompt work over "
        "those steps' time.", "",
        "| config | adapters | sequences | output tok/s | total tok/s | pure-decode tok/s | prefill s | decode s | vs base "
        "| pure decode vs base | vs all-token LoRA (vLLM) | vs same adapters on all tokens (ours) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["summary"]:
        decode = "" if r.get("decode_tok_s") is None else f"{r['decode_tok_s']:.1f}"
        lines.append(
            f"| {r['config']} | {r['adapters']} | {r.get('sequences', '')} | {r['output_tok_s']:.1f} "
            f"({r['output_tok_s_min']:.1f}-{r['output_tok_s_max']:.1f}) | {r['total_tok_s']:.1f} | {decode} | "
            f"{r['prefill_s']:.3f} | {r['decode_s']:.3f} | {fmt(r['vs_base'])} | {fmt(r.get('decode_vs_base'))} | "
            f"{fmt(r['vs_lora_all_token'])} | {fmt(r.get('vs_ours_all_token'))} |"
        )
    paths["markdown"].write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    summary = result["summary"]
    sweep = sorted({r.get("sequences", 0) for r in summary})
    for sequences in sweep:
        suffix = f", {sequences} seqs" if len(sweep) > 1 else ""
        rows = [r for r in summary if r.get("sequences", 0) == sequences]
        base = next((r for r in rows if r["config"] == "base"), None)
        for name in sorted({r["config"] for r in rows if r["config"] != "base"}):
            pts = sorted((r["adapters"], r["output_tok_s"]) for r in rows if r["config"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name + suffix)
        if base:
            ax.axhline(base["output_tok_s"], color="gray", linestyle="--", label="base (no adapters)" + suffix)
    ax.set_xscale("log", base=2)
    ax.set(title="Rollout throughput vs number of adapters", xlabel="adapters in the batch", ylabel="output tokens / s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)
    return paths
