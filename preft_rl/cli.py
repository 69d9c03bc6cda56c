"""`preft-rl` console script.

    preft-rl report OUTPUT_DIR       render a GRPO run's log.jsonl as report.md + PNG plots
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preft-rl", description="Prefill-only adapter RL tools")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="render a training run's log.jsonl as Markdown and PNG plots")
    report.add_argument("output_dir", help="the output_dir of a PreftGRPOTrainer run")
    args = parser.parse_args(argv)
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
