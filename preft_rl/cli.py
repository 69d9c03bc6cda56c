"""`preft-rl` console script.

    preft-rl report OUTPUT_DIR       render a GRPO run's log.jsonl as report.md + PNG plots
    preft-rl bench rollout ...       PreFT vs all-token multi-LoRA vs base rollout throughput (see --help)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preft-rl", description="Prefill-only adapter RL tools")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="render a training run's log.jsonl as Markdown and PNG plots")
    report.add_argument("output_dir", help="the output_dir of a PreftGRPOTrainer run")
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    rollout = bench.add_parser("rollout", help="rollout throughput: PreFT vs all-token multi-LoRA vs base, by adapters")
    rollout.add_argument("--model", default="smollm2-135m-instruct", help="model id, path or offline name (default: %(default)s)")
    rollout.add_argument("--adapters", default="1,8,64,512", help="comma-separated adapter counts (default: %(default)s)")
    rollout.add_argument("--methods", default="lora,loreft", help="PreFT methods, comma-separated (default: %(default)s)")
    rollout.add_argument("--rank", type=int, default=16, help="adapter rank (default: %(default)s)")
    rollout.add_argument("--prompts", type=int, default=64, help="requests per run, adapters assigned round-robin (default: %(default)s)")
    rollout.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: %(default)s)")
    rollout.add_argument("--gen-len", type=int, default=64, help="generated tokens per request (default: %(default)s)")
    rollout.add_argument("--repeats", type=int, default=3, help="runs per configuration, alternating; the median is reported (default: %(default)s)")
    rollout.add_argument("--max-num-seqs", type=int, default=64, help="vLLM max_num_seqs for every engine (default: %(default)s)")
    rollout.add_argument("--max-num-batched-tokens", type=int, default=4096, help="vLLM max_num_batched_tokens (default: %(default)s)")
    rollout.add_argument("--all-token", action=argparse.BooleanOptionalAction, default=True,
                         help="also run vLLM's native all-token multi-LoRA (default: on; --no-all-token for quick PreFT-vs-base checks)")
    rollout.add_argument("--out", default="outputs/bench-rollout", help="folder for rollout.json/.md/.png (default: %(default)s)")
    rollout.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from preft_rl.reports import rollout as bench_rollout

        cfg = bench_rollout.RolloutBenchConfig(
            model=args.model, adapters=[int(n) for n in args.adapters.split(",")], methods=args.methods.split(","),
            rank=args.rank, prompts=args.prompts, prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=args.repeats,
            out=args.out, seed=args.seed, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            all_token=args.all_token,
        )
        result = bench_rollout.run(cfg)
        command = "preft-rl " + " ".join(argv if argv is not None else sys.argv[1:])
        paths = bench_rollout.write_report(result, args.out, command)
        print(paths["markdown"].read_text())
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    if args.command == "report":
        from preft_rl.reports.training import render_training_report

        try:
            path = render_training_report(args.output_dir)
        except (FileNotFoundError, ValueError) as exc:
            print(f"preft-rl report: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
