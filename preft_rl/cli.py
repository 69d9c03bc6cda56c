"""`preft-rl` console script.

    preft-rl report OUTPUT_DIR       render a GRPO run's log.jsonl as report.md + PNG plots
    preft-rl bench rollout ...       PreFT vs all-token multi-LoRA vs base rollout throughput (see --help)
    preft-rl bench train ...         GRPO step time and memory per phase, against TRL's GRPOTrainer (see --help)
    preft-rl bench tenants ...       multi-tenant GRPO: tenant-steps per hour vs sequential runs and all-token adapters
    preft-rl bench agent ...         multi-turn rollouts with tool results: throughput and prefix-cache reuse
    preft-rl bench adapter-cache ... many adapters on few slots, loaded from disk: ours vs vLLM's LoRA resolver
    preft-rl study ...               PreFT vs all-token adapters under the same GRPO trainer (see --help)
    preft-rl plan --model ...        per-GPU memory of the rollout and training phases, and what fits (see --help)
    preft-rl serve MODEL --adapters NAME=DIR ...   vLLM's OpenAI-compatible server with prefill-only adapters
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:  # its unknown flags go to `vllm serve`, so it parses its own arguments
        from preft_rl.engine.server.launch import main as serve_main

        return serve_main(args_list[1:])
    # no prefix abbreviations: `--seed 3` must not silently mean `--seeds 3` (and start a study)
    parser = argparse.ArgumentParser(prog="preft-rl", description="Prefill-only adapter RL tools", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", allow_abbrev=False, help="render a training run's log.jsonl as Markdown and PNG plots")
    report.add_argument("output_dir", help="the output_dir of a PreftGRPOTrainer run")
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    rollout = bench.add_parser("rollout", allow_abbrev=False, help="rollout throughput: PreFT vs all-token multi-LoRA vs base, by adapters")
    rollout.add_argument("--model", default="smollm2-135m-instruct", help="model id, path or offline name (default: %(default)s)")
    rollout.add_argument("--adapters", default="1,8,64,512", help="comma-separated adapter counts (default: %(default)s)")
    rollout.add_argument("--methods", default="lora,loreft", help="PreFT methods, comma-separated (default: %(default)s)")
    rollout.add_argument("--rank", type=int, default=16, help="adapter rank (default: %(default)s)")
    rollout.add_argument("--prompts", default="64", help="requests per run, adapters assigned round-robin; several counts "
                         "(e.g. 8,64,256) make a batch-size sweep (default: %(default)s)")
    rollout.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: %(default)s)")
    rollout.add_argument("--gen-len", type=int, default=64, help="generated tokens per request (default: %(default)s)")
    rollout.add_argument("--repeats", type=int, default=3, help="runs per configuration, alternating; the median is reported (default: %(default)s)")
    rollout.add_argument("--max-num-seqs", type=int, default=None,
                         help="vLLM max_num_seqs for every engine (default: the largest --prompts, all requests at once)")
    rollout.add_argument("--max-num-batched-tokens", type=int, default=4096, help="vLLM max_num_batched_tokens (default: %(default)s)")
    rollout.add_argument("--all-token", action=argparse.BooleanOptionalAction, default=True,
                         help="also run vLLM's native all-token multi-LoRA (default: on; --no-all-token for quick PreFT-vs-base checks)")
    rollout.add_argument("--ours-all-token", action=argparse.BooleanOptionalAction, default=True,
                         help="also run our engine with the same adapters on every token (all-<method>; default: on)")
    rollout.add_argument("--out", default="outputs/bench-rollout", help="folder for rollout.json/.md/.png (default: %(default)s)")
    rollout.add_argument("--seed", type=int, default=0)
    serve_bench = bench.add_parser("serve", allow_abbrev=False, help="serving over HTTP: preft-rl serve vs the same "
                                   "adapters on all tokens vs vLLM's LoRA server vs the base, with N concurrent clients")
    serve_bench.add_argument("--model", default="smollm2-135m-instruct", help="model id, path or offline name (default: %(default)s)")
    serve_bench.add_argument("--adapters", type=int, default=8, help="adapters per server, requests round-robin (default: %(default)s)")
    serve_bench.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: %(default)s)")
    serve_bench.add_argument("--requests", type=int, default=4, help="requests per client, one after another (default: %(default)s)")
    serve_bench.add_argument("--rank", type=int, default=16, help="adapter rank (default: %(default)s)")
    serve_bench.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: %(default)s)")
    serve_bench.add_argument("--gen-len", type=int, default=64, help="generated tokens per request (default: %(default)s)")
    serve_bench.add_argument("--repeats", type=int, default=3, help="runs per server, alternating; medians reported (default: %(default)s)")
    serve_bench.add_argument("--servers", default="base,preft-lora,all-lora,vllm-lora", help="comma-separated (default: %(default)s)")
    serve_bench.add_argument("--max-num-seqs", type=int, default=64, help="vLLM max_num_seqs for every server (default: %(default)s)")
    serve_bench.add_argument("--out", default="outputs/bench-serve", help="folder for serve.json/.md (default: %(default)s)")
    serve_bench.add_argument("--seed", type=int, default=0)
    train_bench = bench.add_parser("train", allow_abbrev=False, help="GRPO step time per phase: preft-rl's trainer vs TRL's "
                                   "GRPOTrainer (PEFT LoRA; colocated vLLM and HF generate) on the same work")
    _add_train_bench_arguments(train_bench)
    tenants_bench = bench.add_parser("tenants", allow_abbrev=False, help="multi-tenant GRPO: tenant-steps per hour against "
                                     "sequential single-tenant runs and against all-token adapters, by tenant count")
    _add_tenants_bench_arguments(tenants_bench)
    cache_bench = bench.add_parser("adapter-cache", allow_abbrev=False, help="many adapters on few slots, loaded from disk "
                                   "on first use: preft-rl serve --adapter-dir vs vLLM's LoRA resolver, each vs all resident")
    _add_adapter_cache_bench_arguments(cache_bench)
    store_bench = bench.add_parser("traffic-store", allow_abbrev=False, help="records per second one traffic store "
                                   "(serve --record) takes, one writer and many")
    store_bench.add_argument("--records", type=int, default=20_000, help="records per run (default: %(default)s)")
    store_bench.add_argument("--writers", default="1,32", help="concurrent writers per run, comma-separated (default: %(default)s)")
    store_bench.add_argument("--prompt-len", type=int, default=128)
    store_bench.add_argument("--gen-len", type=int, default=128)
    store_bench.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    store_bench.add_argument("--out", default="outputs/bench-traffic-store")
    agent_bench = bench.add_parser("agent", allow_abbrev=False, help="multi-turn rollouts with tool results between turns: "
                                   "PreFT vs all-token adapters vs base, throughput and prefix-cache reuse of earlier turns")
    _add_agent_bench_arguments(agent_bench)
    study = sub.add_parser("study", allow_abbrev=False, help="PreFT vs all-token adapters: GRPO learning curves and held-out gains over seeds")
    _add_study_arguments(study)
    plan = sub.add_parser("plan", allow_abbrev=False, help="per-GPU memory plan: rollout and training phases, largest batch and KV cache")
    _add_plan_arguments(plan)
    sub.add_parser("serve", add_help=False, help="vLLM's OpenAI-compatible server with many prefill-only adapters "
                   "(preft-rl serve --help)")
    online = sub.add_parser("online", allow_abbrev=False, help="train each tenant on its recorded traffic as it comes, "
                            "and push the adapters into the server (beside `preft-rl serve --record`)")
    from preft_rl.traffic.cli import add_arguments as _online_arguments

    _online_arguments(online)
    tenant_key = sub.add_parser("tenant-key", allow_abbrev=False, help="a new random API key for a tenant, and the hash "
                                "that goes in `preft-rl serve --tenant-keys FILE`")
    tenant_key.add_argument("--hash-stdin", action="store_true", help="hash a key read from standard input instead")
    args = parser.parse_args(argv)
    if args.command == "online":
        from preft_rl.traffic.cli import main as online_main

        return online_main(args)
    if args.command == "tenant-key":
        from preft_rl.engine.server.tenants import hash_key, new_key

        if args.hash_stdin:
            print(hash_key(sys.stdin.readline().rstrip("\n")))
            return 0
        key = new_key()
        print(f"key:  {key}\nhash: {hash_key(key)}\n(give the key to the tenant; put only the hash in the tenant keys file)")
        return 0
    if args.command == "plan":
        return _plan(args)
    if args.command == "study":
        return _study(args, argv)
    if args.command == "bench" and args.bench == "serve":
        return _bench_serve(args, argv)
    if args.command == "bench" and args.bench == "train":
        return _bench_train(args, argv)
    if args.command == "bench" and args.bench == "tenants":
        return _bench_tenants(args, argv)
    if args.command == "bench" and args.bench == "adapter-cache":
        return _bench_adapter_cache(args, argv)
    if args.command == "bench" and args.bench == "agent":
        return _bench_agent(args, argv)
    if args.command == "bench" and args.bench == "traffic-store":
        from preft_rl.reports import traffic as bench_traffic

        return _run_bench("traffic-store", bench_traffic, argv, lambda: bench_traffic.TrafficStoreBenchConfig(
            records=args.records, writers=_int_list(args.writers, "--writers"), prompt_len=args.prompt_len,
            gen_len=args.gen_len, synchronous=args.synchronous, out=args.out))
    if args.command == "bench":
        from preft_rl.reports import rollout as bench_rollout

        return _run_bench("rollout", bench_rollout, argv, lambda: bench_rollout.RolloutBenchConfig(
            model=args.model, adapters=_int_list(args.adapters, "--adapters"), methods=args.methods.split(","),
            rank=args.rank, prompts=_int_list(args.prompts, "--prompts"), prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
            out=args.out, seed=args.seed, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            all_token=args.all_token, ours_all_token=args.ours_all_token,
        ))
    if args.command == "report":
        from preft_rl.reports.training import render_training_report

        try:
            path = render_training_report(args.output_dir)
        except (FileNotFoundError, ValueError) as exc:
            print(f"preft-rl report: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integers, e.g. 1,8,64") from None


def _run_bench(name: str, module: Any, argv: list[str] | None, make_config: Callable[[], Any],
               run_kwargs: dict[str, Any] | None = None, report_args: Callable[[], tuple] = tuple) -> int:
    """`preft-rl bench <name>`: build and check the config (a bad value: its message, exit 2), run `module.run`, write
    the report with the command line in it, print the table and the paths."""
    try:
        cfg, extra = make_config(), report_args()
    except (ValueError, OSError) as exc:
        print(f"preft-rl bench {name}: {exc}", file=sys.stderr)
        return 2
    result = module.run(cfg, **(run_kwargs or {}))
    command = "preft-rl " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = module.write_report(result, cfg.out, command, *extra)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _bench_serve(args: argparse.Namespace, argv: list[str] | None) -> int:
    from preft_rl.reports import serve as bench_serve

    return _run_bench("serve", bench_serve, argv, lambda: bench_serve.ServeBenchConfig(
        model=args.model, adapters=args.adapters, clients=args.clients, requests=args.requests, rank=args.rank,
        prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats, servers=args.servers.split(","),
        max_num_seqs=args.max_num_seqs, out=args.out, seed=args.seed,
    ))


def _add_train_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from preft_rl.reports.train import SYSTEMS, TrainBenchConfig

    d = TrainBenchConfig()
    parser.add_argument("--model", default=d.model, help="model id, path or offline name (default: %(default)s)")
    parser.add_argument("--data", default=None, help="GSM8K: a jsonl or a folder with train.jsonl (default: the shared copy, else the hub)")
    parser.add_argument("--systems", default=",".join(d.systems), help=f"comma-separated, of {', '.join(SYSTEMS)} (default: %(default)s; "
                        "the TRL ones are skipped, with a note, when TRL is not installed)")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="runs per system, alternating (default: %(default)s)")
    parser.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step, help="(default: %(default)s)")
    parser.add_argument("--num-generations", type=int, default=d.num_generations, help="completions per prompt (default: %(default)s)")
    parser.add_argument("--max-completion-length", type=int, default=d.max_completion_length, help="(default: %(default)s)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank, every linear layer (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate, help="(default: %(default)s)")
    parser.add_argument("--beta", type=float, default=d.beta, help="KL coefficient (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=d.temperature, help="(default: %(default)s)")
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=d.cpu_kv_cache_gib, help="vLLM's CPU KV cache for every system (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=d.out, help="folder for train.json/.md and runs/ (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' logging in the runs")


def _bench_train(args: argparse.Namespace, argv: list[str] | None) -> int:
    from preft_rl.reports import train as bench_train

    return _run_bench("train", bench_train, argv, lambda: bench_train.TrainBenchConfig(
        model=args.model, data=args.data, systems=args.systems.split(","), steps=args.steps, warmup_steps=args.warmup_steps,
        repeats=args.repeats, prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, rank=args.rank, learning_rate=args.learning_rate, beta=args.beta,
        temperature=args.temperature, cpu_kv_cache_gib=args.cpu_kv_cache_gib, seed=args.seed, out=args.out,
    ), run_kwargs={"verbose": args.verbose})


def _add_agent_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from preft_rl.reports.agent import AgentBenchConfig

    d = AgentBenchConfig()
    parser.add_argument("--model", default=d.model, help="model id, path or offline name (default: %(default)s)")
    parser.add_argument("--adapters", default=",".join(map(str, d.adapters)), help="comma-separated adapter counts (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(d.methods), help="comma-separated adapter methods (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=d.rank, help="adapter rank (default: %(default)s)")
    parser.add_argument("--conversations", type=int, default=d.conversations, help="conversations rolled out together (default: %(default)s)")
    parser.add_argument("--turns", default=",".join(map(str, d.turns)), help="comma-separated turn counts, each >= 2 (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=d.prompt_len, help="first prompt tokens (default: %(default)s)")
    parser.add_argument("--gen-len", type=int, default=d.gen_len, help="generated tokens per turn (default: %(default)s)")
    parser.add_argument("--tool-len", type=int, default=d.tool_len, help="tool-result tokens between turns (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="runs per configuration, alternating (default: %(default)s)")
    parser.add_argument("--no-all-token", dest="all_token", action="store_false", help="skip vLLM's native multi-LoRA")
    parser.add_argument("--no-ours-all-token", dest="ours_all_token", action="store_false",
                        help="skip our engine with the adapters on every token")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=d.out, help="folder for agent.json/.md (default: %(default)s)")


def _bench_agent(args: argparse.Namespace, argv: list[str] | None) -> int:
    from preft_rl.reports import agent as bench_agent

    return _run_bench("agent", bench_agent, argv, lambda: bench_agent.AgentBenchConfig(
        model=args.model, adapters=_int_list(args.adapters, "--adapters"), methods=args.methods.split(","), rank=args.rank,
        conversations=args.conversations, turns=_int_list(args.turns, "--turns"), prompt_len=args.prompt_len,
        gen_len=args.gen_len, tool_len=args.tool_len, repeats=args.repeats, all_token=args.all_token,
        ours_all_token=args.ours_all_token, seed=args.seed, out=args.out))


def _add_tenants_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from preft_rl.reports.tenants import SYSTEMS, TenantBenchConfig

    d = TenantBenchConfig()
    parser.add_argument("--model", default=d.model, help="model id, path or offline name (default: %(default)s)")
    parser.add_argument("--tenants", default=",".join(map(str, d.tenants)), help="comma-separated tenant counts (default: %(default)s)")
    parser.add_argument("--systems", default=",".join(d.systems), help=f"comma-separated, of {', '.join(SYSTEMS)} (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--prompts-per-tenant", type=int, default=d.prompts_per_tenant, help="prompts per tenant and step (default: %(default)s)")
    parser.add_argument("--num-generations", type=int, default=d.num_generations, help="completions per prompt (default: %(default)s)")
    parser.add_argument("--max-completion-length", type=int, default=d.max_completion_length, help="(default: %(default)s)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank, every linear layer (default: %(default)s)")
    parser.add_argument("--tenants-per-forward", type=int, default=d.tenants_per_forward,
                        help="tenants' rows per training forward and backward in the multi-tenant runs, bounding their "
                             "activation memory (0: all of them in one; default: %(default)s)")
    parser.add_argument("--tenants-per-step", type=int, default=d.tenants_per_step,
                        help="tenants trained per step in the multi-tenant runs, round robin (0: all; default: %(default)s)")
    parser.add_argument("--tenant-offload", default=d.tenant_offload, choices=("none", "cpu", "disk"),
                        help="where the multi-tenant runs keep the tenants not picked for a step (the trainer's "
                             "tenant_offload; default: %(default)s)")
    parser.add_argument("--run-steps", type=int, default=d.run_steps,
                        help="run length the start-up is spread over in the 'with start-up' columns (default: %(default)s)")
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=d.cpu_kv_cache_gib, help="vLLM's CPU KV cache (default: %(default)s)")
    parser.add_argument("--predictions", default=None, help="a text file of predictions written before the run, copied into the report")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=d.out, help="folder for tenants.json/.md and runs/ (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' logging in the runs")


def _bench_tenants(args: argparse.Namespace, argv: list[str] | None) -> int:
    from preft_rl.reports import tenants as bench_tenants

    return _run_bench("tenants", bench_tenants, argv, lambda: bench_tenants.TenantBenchConfig(
        model=args.model, tenants=_int_list(args.tenants, "--tenants"), systems=args.systems.split(","), steps=args.steps,
        warmup_steps=args.warmup_steps, prompts_per_tenant=args.prompts_per_tenant, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, rank=args.rank, tenants_per_forward=args.tenants_per_forward,
        tenants_per_step=args.tenants_per_step, tenant_offload=args.tenant_offload, run_steps=args.run_steps, cpu_kv_cache_gib=args.cpu_kv_cache_gib, seed=args.seed, out=args.out,
    ), run_kwargs={"verbose": args.verbose},
        report_args=lambda: (Path(args.predictions).read_text().splitlines() if args.predictions else None,))


def _add_adapter_cache_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from preft_rl.reports.adapter_cache import SERVERS, AdapterCacheBenchConfig

    d = AdapterCacheBenchConfig()
    parser.add_argument("--model", default=d.model, help="model id, path or offline name (default: %(default)s)")
    parser.add_argument("--adapters", type=int, default=d.adapters, help="adapters written to disk (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=d.slots, help="device slots: --max-adapters / --max-loras (default: %(default)s)")
    parser.add_argument("--cpu-adapters", type=int, default=d.cpu_adapters,
                        help="adapters held in host memory: --max-cpu-adapters / --max-cpu-loras (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=d.requests, help="requests in the traffic (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=d.clients, help="concurrent streaming clients (default: %(default)s)")
    parser.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent of the adapters' popularity (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--target-modules", default=",".join(d.target_modules), help="comma-separated (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--gen-len", type=int, default=d.gen_len, help="generated tokens (default: %(default)s)")
    parser.add_argument("--servers", default=",".join(d.servers), help=f"comma-separated, of {', '.join(SERVERS)} (default: all)")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--predictions", default=None, help="a text file of predictions written before the run, copied into the report")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--out", default=d.out, help="folder for adapter-cache.json/.md (default: %(default)s)")


def _bench_adapter_cache(args: argparse.Namespace, argv: list[str] | None) -> int:
    from preft_rl.reports import adapter_cache

    return _run_bench("adapter-cache", adapter_cache, argv, lambda: adapter_cache.AdapterCacheBenchConfig(
        model=args.model, adapters=args.adapters, slots=args.slots, cpu_adapters=args.cpu_adapters, requests=args.requests,
        clients=args.clients, zipf=args.zipf, rank=args.rank, target_modules=args.target_modules.split(","),
        prompt_len=args.prompt_len, gen_len=args.gen_len, servers=args.servers.split(","), max_num_seqs=args.max_num_seqs,
        seed=args.seed, out=args.out,
    ), report_args=lambda: (Path(args.predictions).read_text().splitlines() if args.predictions else None,))


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from preft_rl.adapters.methods import method_names
    from preft_rl.plan import PRESETS, PlanInputs

    d = PlanInputs()
    parser.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}), a config.json, a model folder or an offline name")
    parser.add_argument("--gpus", type=int, default=d.gpus, help="training processes, one GPU each (default: %(default)s)")
    parser.add_argument("--gpu-memory", type=float, default=d.gpu_memory_gib, help="GiB per GPU (default: %(default)s)")
    parser.add_argument("--zero", type=int, default=d.zero, help="DeepSpeed ZeRO stage 0-3 (default: %(default)s)")
    parser.add_argument("--tp", type=int, default=d.tp, help="engine tensor-parallel size (default: %(default)s)")
    parser.add_argument("--adapters", type=int, default=d.adapters, help="adapter slots in the engine (default: %(default)s)")
    parser.add_argument("--tenants", type=int, default=d.tenants,
                        help="adapters trained in one run (PreftGRPOTrainer(tenants=...)); the engine holds one slot each (default: %(default)s)")
    parser.add_argument("--tenants-per-step", type=int, default=None,
                        help="tenants trained per step, each with --batch rows per micro-batch (default: all)")
    parser.add_argument("--tenants-per-forward", type=int, default=None,
                        help="tenants' rows in one training forward and backward (the trainer's tenants_per_forward): "
                             "activations grow with it, not with the tenant count (default: all tenants of a step)")
    parser.add_argument("--tenant-offload", choices=("cpu", "disk"), default=None,
                        help="where the tenants not in a step wait (the trainer's tenant_offload; DDP, --zero 0): the GPU "
                             "holds only --tenants-per-step tenants (default: every tenant on the GPU)")
    parser.add_argument("--method", choices=method_names(), default=d.method)
    parser.add_argument("--rank", type=int, default=d.rank, help="adapter rank (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--completion-len", type=int, default=d.completion_len, help="completion tokens (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=d.batch, help="rows per training micro-batch per GPU (default: %(default)s)")
    parser.add_argument("--generations", type=int, default=d.generations, help="completions per prompt (default: %(default)s)")
    parser.add_argument("--share-prompts", action=argparse.BooleanOptionalAction, default=d.share_prompts,
                        help="compute each group's prompt once in training (the trainer's default: on)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d.gradient_checkpointing)
    parser.add_argument("--sleep", action=argparse.BooleanOptionalAction, default=d.sleep,
                        help="the engine sleeps (level 1) while the trainer trains (default: on; CUDA only)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="the engine's share of each GPU (default: what the trainer's fixed state leaves)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--dtype-bytes", type=int, choices=[2, 4], default=d.dtype_bytes, help="2 for bf16/fp16, 4 for fp32")


def _plan(args: argparse.Namespace) -> int:
    from preft_rl.plan import ModelShape, PlanInputs, format_plan, make_plan

    try:
        shape = ModelShape.resolve(args.model)
        inputs = PlanInputs(
            gpus=args.gpus, gpu_memory_gib=args.gpu_memory, zero=args.zero, tp=args.tp, adapters=args.adapters,
            tenants=args.tenants, tenants_per_step=args.tenants_per_step, tenants_per_forward=args.tenants_per_forward, tenant_offload=args.tenant_offload,
            method=args.method, rank=args.rank, prompt_len=args.prompt_len, completion_len=args.completion_len,
            batch=args.batch, generations=args.generations, share_prompts=args.share_prompts,
            gradient_checkpointing=args.gradient_checkpointing, sleep=args.sleep, dtype_bytes=args.dtype_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization, max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
        )
    except ValueError as exc:
        print(f"preft-rl plan: {exc}", file=sys.stderr)
        return 2
    plan = make_plan(shape, inputs)
    print(format_plan(plan))
    return 0 if plan.fits else 1


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    from preft_rl.reports.study import DEFAULT_METHODS, METHODS, TASKS
    from preft_rl.trainers import PreftGRPOConfig
    from preft_rl.trainers.cli_args import add_dataclass_arguments
    from preft_rl.trainers.presets import GSM8K_CPU

    parser.add_argument("--out", default="outputs/study", help="folder for runs/, study.json, study.md and plots (default: %(default)s)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model id, path or offline name (default: %(default)s)")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: gsm8k and/or a numeric reasoning-gym task (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {list(METHODS)} (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--eval-problems", type=int, default=200, help="held-out problems per task (default: %(default)s)")
    parser.add_argument("--train-problems", type=int, default=2000, help="generated training problems per task (default: %(default)s)")
    parser.add_argument("--data", default=None, help="GSM8K source: a jsonl, a folder with train/test.jsonl, or 'hub'")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's and the other libraries' logging")
    # a study sets each run's output folder, seed and checkpointing itself (--out, --seeds)
    add_dataclass_arguments(parser, PreftGRPOConfig, GSM8K_CPU, exclude=_STUDY_OWN_FIELDS)


_STUDY_OWN_FIELDS = ("output_dir", "seed", "save_steps")


def _study(args: argparse.Namespace, argv: list[str] | None) -> int:
    import dataclasses

    from preft_rl.console import quiet_libraries
    from preft_rl.reports.study import StudyConfig, run
    from preft_rl.trainers import PreftGRPOConfig
    from preft_rl.trainers.cli_args import _simple_type

    quiet_libraries(args.verbose)
    import typing

    hints = typing.get_type_hints(PreftGRPOConfig)
    trainer = {}
    for f in dataclasses.fields(PreftGRPOConfig):
        if _simple_type(hints[f.name]) is None or f.name in _STUDY_OWN_FIELDS:
            continue
        if getattr(args, f.name) != f.default:
            trainer[f.name] = getattr(args, f.name)
    try:
        cfg = StudyConfig(
            out=args.out, model=args.model, tasks=args.tasks.split(","), methods=args.methods.split(","),
            seeds=_int_list(args.seeds, "--seeds"), eval_problems=args.eval_problems, train_problems=args.train_problems,
            data=args.data, trainer=trainer,
        )
    except ValueError as exc:
        print(f"preft-rl study: {exc}", file=sys.stderr)
        return 2
    run(cfg, verbose=args.verbose)
    print((Path(cfg.out) / "study.md").read_text())
    print(f"command: preft-rl {' '.join(argv if argv is not None else sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
