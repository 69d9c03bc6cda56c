"""Multi-turn rollout benchmark: PreFT vs all-token adapters vs the base model, with tool results between turns.

    preft-rl bench agent --adapters 1,8,64 --conversations 32 --turns 3 --prompt-len 160 --gen-len 32 --tool-len 32 \\
        --out docs/benchmarks/agent-cpu

One process, one run: every conversation (random prompt tokens, adapters round-robin) is rolled out turn by turn, one
engine call per turn for all conversations, as the trainer's tool loop does; between turns each conversation gains
--tool-len random tool-result tokens. Greedy, exactly --gen-len tokens per turn, prefix caching ON (the point: a later
turn should find its earlier turns in the cache). Systems:
  base              the base model in plain vLLM (BaseEngine),
  preft-<method>    PreftEngine, later turns marking their earlier turns' sampled tokens (DESIGN invariant 9),
  all-<method>      PreftEngine(adapter_scope="all"): the same adapters on every token,
  lora-all-token    vLLM's native multi-LoRA with the same adapters (LoRA only).
Reported per (system, adapters): output tokens/s over the whole rollout, and the share of each later turn's reusable
tokens (the full KV blocks of the tokens the previous turn computed: its prompt and every sampled token but the last,
whose KV is computed only when it is fed back) that vLLM served from its prefix cache (`num_cached_tokens`). Configurations alternate within each repeat; medians are reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import check_at_least, start_report
from .rollout import bench_engines  # the same systems and random adapters as `bench rollout`

BLOCK = 128  # vLLM-CPU's KV block size (also the default on GPU is 16; the share is computed with the engine's own)


@dataclass
class AgentBenchConfig:
    model: str = "smollm2-135m-instruct"
    adapters: list[int] = field(default_factory=lambda: [1, 8, 64])
    methods: list[str] = field(default_factory=lambda: ["lora"])
    rank: int = 16
    conversations: int = 32
    turns: list[int] = field(default_factory=lambda: [3])
    prompt_len: int = 160
    gen_len: int = 32
    tool_len: int = 32
    repeats: int = 1
    out: str = "outputs/bench-agent"
    seed: int = 0
    all_token: bool = True  # vLLM's native multi-LoRA too
    ours_all_token: bool = True  # PreftEngine(adapter_scope="all") too
    block_size: int = BLOCK

    def __post_init__(self) -> None:
        if isinstance(self.turns, int):
            self.turns = [self.turns]
        if not self.adapters or min(self.adapters) < 1 or not self.turns or min(self.turns) < 2:
            raise ValueError(f"--adapters {self.adapters} must be >= 1 and --turns {self.turns} >= 2 (a later turn to measure)")
        check_at_least(self, 1, ("rank", "conversations", "prompt_len", "gen_len", "tool_len", "repeats"))
        from preft_rl.adapters.methods import method_names

        if unknown := set(self.methods) - set(method_names()):
            raise ValueError(f"--methods {sorted(unknown)}: use some of {method_names()}")

    @property
    def max_model_len(self) -> int:
        return self.prompt_len + max(self.turns) * (self.gen_len + self.tool_len) + 8


def rollout(engine: Any, name: str, prompts: list[list[int]], tools: list[list[list[int]]], adapters: list[str] | None,
            turns: int, params: Any, block: int) -> tuple[float, int, int, int]:
    """One multi-turn rollout of every conversation: (seconds, sampled tokens, reusable tokens of later turns, of them
    served from the prefix cache). Only PreFT engines get sampled spans: for the others every token is alike."""
    marks = name.startswith("preft-")
    ids = [list(p) for p in prompts]
    spans: list[list[tuple[int, int]]] = [[] for _ in prompts]
    previous = [0] * len(prompts)  # each conversation's sequence length after the previous turn
    sampled = reusable = cached = 0
    start = time.perf_counter()
    for turn in range(turns):
        requests = [{"prompt_token_ids": seq, "sampled_spans": s} if marks and s else seq for seq, s in zip(ids, spans)]
        outs = engine.generate(requests, params, adapters=adapters, use_tqdm=False)
        for i, out in enumerate(outs):
            new = list(out.outputs[0].token_ids)
            sampled += len(new)
            if turn:  # the previous turn's last sampled token was never computed (its KV does not exist yet)
                full = (previous[i] - 1) // block * block
                reusable += full
                cached += min(out.num_cached_tokens or 0, full)
            spans[i].append((len(ids[i]), len(ids[i]) + len(new)))
            ids[i] = ids[i] + new
            previous[i] = len(ids[i])
            if turn < turns - 1:
                ids[i] = ids[i] + tools[i][turn]
    return time.perf_counter() - start, sampled, reusable, cached


def run(cfg: AgentBenchConfig, progress: bool = True) -> dict[str, Any]:
    from preft_rl.engine import SamplingParams

    settings = dict(enforce_eager=True, enable_prefix_caching=True, max_num_seqs=cfg.conversations,
                    max_num_batched_tokens=max(4096, cfg.max_model_len), seed=cfg.seed, max_model_len=cfg.max_model_len)
    engines = bench_engines(cfg, settings)
    rng = np.random.default_rng(cfg.seed)
    vocab = len(engines["base"].tokenizer)
    params = SamplingParams(max_tokens=cfg.gen_len, min_tokens=cfg.gen_len, temperature=0.0, ignore_eos=True)
    runs = [(name, n, turns) for turns in cfg.turns for name, n in
            [("base", 0)] + [(name, n) for n in cfg.adapters for name in engines if name != "base"]]
    rows: list[dict[str, Any]] = []
    for repeat in range(cfg.repeats):
        order = runs[repeat % len(runs):] + runs[: repeat % len(runs)]
        for name, n, turns in order:
            # fresh random tokens for every run: nothing of an earlier run is in the cache
            prompts = [rng.integers(100, vocab - 100, cfg.prompt_len).tolist() for _ in range(cfg.conversations)]
            tools = [[rng.integers(100, vocab - 100, cfg.tool_len).tolist() for _ in range(turns)] for _ in prompts]
            adapters = None if n == 0 else [f"a{i % n}" for i in range(cfg.conversations)]
            seconds, sampled, reusable, cached = rollout(engines[name], name, prompts, tools, adapters, turns, params,
                                                         cfg.block_size)
            rows.append({"config": name, "adapters": n, "turns": turns, "seconds": seconds, "sampled_tokens": sampled,
                         "reusable_tokens": reusable, "cached_tokens": cached})
            if progress:
                print(f"[{repeat + 1}/{cfg.repeats}] {name:15s} N={n:<4d} turns={turns} {sampled / seconds:8.1f} output tok/s, "
                      f"cache {cached / max(reusable, 1):.3f} of earlier turns' full blocks", flush=True)
    for engine in engines.values():
        engine.close()
    return {"config": asdict(cfg), "measurements": rows, "summary": summarize(rows)}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["adapters"], row["turns"]), []).append(row)
    out = []
    for (name, n, turns), ms in groups.items():
        tps = [m["sampled_tokens"] / m["seconds"] for m in ms]
        out.append({"config": name, "adapters": n, "turns": turns, "runs": len(ms), "output_tok_s": statistics.median(tps),
                    "output_tok_s_min": min(tps), "output_tok_s_max": max(tps),
                    "cache_share": sum(m["cached_tokens"] for m in ms) / max(sum(m["reusable_tokens"] for m in ms), 1)})
    base = {r["turns"]: r["output_tok_s"] for r in out if r["config"] == "base"}
    by_key = {(r["config"], r["adapters"], r["turns"]): r["output_tok_s"] for r in out}
    for r in out:
        r["vs_base"] = r["output_tok_s"] / base[r["turns"]] if r["turns"] in base else None
        same = by_key.get(("all-" + r["config"].removeprefix("preft-"), r["adapters"], r["turns"])) if r["config"].startswith("preft-") else None
        r["vs_ours_all_token"] = r["output_tok_s"] / same if same else None
        native = by_key.get(("lora-all-token", r["adapters"], r["turns"]))
        r["vs_lora_all_token"] = r["output_tok_s"] / native if native and r["config"] != "lora-all-token" else None
    return sorted(out, key=lambda r: (r["turns"], r["adapters"], r["config"]))


def write_report(result: dict[str, Any], out: str, command: str) -> dict[str, Any]:
    paths = start_report(out, "agent", result, command)
    cfg = result["config"]
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "# Multi-turn rollout throughput", "", f"Command: `{command}`", "",
        f"{cfg['conversations']} conversations x {', '.join(map(str, cfg['turns']))} turns: {cfg['prompt_len']} prompt "
        f"tokens, then per turn {cfg['gen_len']} generated and (between turns) {cfg['tool_len']} tool-result tokens; rank "
        f"{cfg['rank']}, greedy, eager, prefix caching on; median of {cfg['repeats']} alternating runs. Cache share: of "
        "each later turn's previous-turn full KV blocks (prompt and sampled tokens), the share vLLM served from its prefix "
        "cache.", "",
        "| config | adapters | turns | output tok/s | vs base | vs same adapters on all tokens (ours) | vs vLLM LoRA | cache share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["summary"]:
        lines.append(f"| {r['config']} | {r['adapters']} | {r['turns']} | {r['output_tok_s']:.1f} ({r['output_tok_s_min']:.1f}-"
                     f"{r['output_tok_s_max']:.1f}) | {fmt(r['vs_base'])} | {fmt(r['vs_ours_all_token'])} | "
                     f"{fmt(r['vs_lora_all_token'])} | {r['cache_share']:.3f} |")
    paths["markdown"].write_text("\n".join(lines) + "\n")
    return paths
