"""GRPO fine-tuning of a prefill-only adapter on GSM8K, rolling out with the colocated PreftEngine.

CPU (the offline default model, about 11 min on 2 cores after set-up):
    bash scripts/setup.sh && .venv/bin/accelerate launch --config_file examples/accelerate_configs/cpu.yaml examples/grpo_gsm8k.py
    .venv/bin/python examples/grpo_gsm8k.py --method loreft --r 8 --positions f5+l5     # a plain process works too
    .venv/bin/python examples/grpo_gsm8k.py --adapter-scope all                          # the all-token LoRA baseline
    ACCELERATE_USE_CPU=true .venv/bin/torchrun --nproc_per_node 2 examples/grpo_gsm8k.py  # two CPU processes
One GPU:
    accelerate launch --num_processes 1 examples/grpo_gsm8k.py --model Qwen/Qwen2.5-1.5B-Instruct --bf16 --max-steps 300
8 GPUs, DeepSpeed ZeRO-3:
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        examples/grpo_gsm8k.py --model Qwen/Qwen2.5-7B-Instruct --bf16 --max-steps 500

Held-out protocol (before and after training, on the same problems): the first --eval-problems (200) GSM8K
test problems, the prompts `load_gsm8k("test")` gives (the training format), greedy decoding up to
--max-completion-length tokens. Reported: strict accuracy ('#### N' or \\boxed{N} equals the answer), the
format rate (the completion ends in a parseable '#### N' line) and lenient accuracy (the last number equals
the answer), each with the change and a 95% paired-bootstrap interval of the change (problems resampled).
Results go to output_dir: report.md, reward.png, accuracy.png, heldout.json, log.jsonl and the adapter.

Why these defaults (the offline default is SmolLM2-135M-Instruct, Q4_1 weights, on 2 CPU cores):
- The prompt (load_gsm8k's default, so evaluation sees exactly the training prompts) carries one made-up
  worked example: the instruction alone gave 4% greedy completions ending in '#### N' (77% cut off at 160
  tokens); with the example 44% (49% cut off). That leaves the model something it can learn.
- Rewards: strict accuracy + format (1, 1). The model solves 1.5% of the held-out problems (lenient) before
  training, so accuracy alone gives almost every group zero advantage; format carries the signal.
- beta=0.04 (KL to the adapter-off base, no second model): without it (lr 2e-3) the policy collapsed in 5 steps
  to bare 4-5 token answers '#### N' (held-out format 0.445 -> 0.985, accuracy unchanged): the format reward
  hacked. With beta=0.04 and lr 1e-3 completions keep ~70-110 tokens of working.
- 4 prompts x 4 completions per step at temperature 0.7 (1.0 makes this model's samples incoherent), 160
  tokens, lr 1e-3 (the adapter learns the format within 2-3 steps), 6 steps: with two held-out evaluations
  of 200 problems (~3.3 min each on 2 cores) and ~45 s per step this fits 12 minutes.
- Measured with these defaults (docs/benchmarks/learning-cpu.md): 11 min 2 s; held-out format
  0.445 -> 0.855 (+0.410, 95% CI [+0.335, +0.485]), strict 0.005 -> 0.010 (+0.005 [-0.010, +0.025]), lenient
  0.015 -> 0.010; completions keep their working and end in '#### N'.
  The strict-accuracy change stays below +0.03: a CPU-sized run cannot teach a 135M model to solve more
  problems; use a stronger --model on a GPU for accuracy gains.

Data: --data (a GSM8K jsonl or a folder with train.jsonl/test.jsonl), else ../shared/data/gsm8k when
present, else the hub's openai/gsm8k, else GSM8K-style problems generated offline (reasoning-gym).
Every PreftGRPOConfig field with a simple type is a flag (--learning-rate, --beta, --loss-type, ...).
--verbose brings back vLLM's and the other libraries' logging.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from preft_rl.console import quiet_libraries
from preft_rl.trainers.presets import GSM8K_CPU

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
# Defaults of this example (a CPU-sized run, shared with `preft-rl study`); every one is a flag.
EXAMPLE_DEFAULTS = dict(output_dir="outputs/grpo-gsm8k", save_steps=5, **GSM8K_CPU)


def parse_args(argv: list[str] | None = None, config_class: type | None = None, defaults: dict | None = None, doc: str = __doc__):
    from preft_rl import PreftGRPOConfig
    from preft_rl.adapters.methods import method_names
    from preft_rl.models import DEFAULT_MODEL
    from preft_rl.trainers.cli_args import add_dataclass_arguments, dataclass_from_args

    config_class = config_class or PreftGRPOConfig
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default=None)
    parser.add_argument("--method", default="lora", choices=method_names())
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--positions", default="f5+l5", help="ReFT positions ('all' or 'fN+lM'); 'all' with --adapter-scope all")
    parser.add_argument("--adapter-scope", default="prompt", choices=["prompt", "all"],
                        help="'prompt': PreFT (the default); 'all': the all-token baseline, same trainer and data")
    parser.add_argument("--eval-problems", type=int, default=200, help="held-out GSM8K test problems (0: skip)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's and the other libraries' logging")
    add_dataclass_arguments(parser, config_class, EXAMPLE_DEFAULTS if defaults is None else defaults)
    args = parser.parse_args(argv)
    return args, dataclass_from_args(config_class, args)


def main(argv: list[str] | None = None) -> None:
    quiet_libraries(verbose="--verbose" in (argv if argv is not None else sys.argv))  # before vLLM is imported
    from preft_rl import PreftGRPOConfig, PreftGRPOTrainer

    run_job(PreftGRPOTrainer, PreftGRPOConfig, EXAMPLE_DEFAULTS, __doc__, argv)


def run_job(trainer_class: type, config_class: type, defaults: dict, doc: str, argv: list[str] | None = None) -> None:
    """Train with `trainer_class` and score the held-out problems before and after (shared with ppo_gsm8k.py)."""
    from preft_rl import PreftConfig
    from preft_rl.data import load_gsm8k
    from preft_rl.reports.stats import paired_bootstrap
    from preft_rl.reports.training import heldout_table, render_training_report, write_heldout
    from preft_rl.rewards import format_reward, gsm8k_accuracy_reward, gsm8k_last_number_reward

    args, config = parse_args(argv, config_class, defaults, doc)
    source = args.data or (SHARED_GSM8K if SHARED_GSM8K.is_dir() else "auto")
    train = load_gsm8k("train", source=source, shuffle=True, seed=config.seed)
    held_out = load_gsm8k("test", source=source, num_examples=args.eval_problems) if args.eval_problems else None
    positions = "all" if args.adapter_scope == "all" else args.positions
    # LoRA: alpha = 2r on every linear layer (the defaults); ReFT: the given positions
    preft = PreftConfig.for_method(args.method, r=args.r, positions=positions, adapter_scope=args.adapter_scope)
    trainer = trainer_class(
        args.model, [gsm8k_accuracy_reward, format_reward], args=config, train_dataset=train, preft_config=preft
    )
    protocol = [gsm8k_accuracy_reward, format_reward, gsm8k_last_number_reward]
    try:
        before = trainer.evaluation_scores(protocol, held_out) if held_out is not None else None
        metrics = trainer.train(resume_from_checkpoint=args.resume or None)
        after = trainer.evaluation_scores(protocol, held_out) if held_out is not None else None
    finally:
        trainer.close()
    if not trainer.accelerator.is_main_process:
        return
    print(f"\nstep {metrics['step']}: train reward {metrics['reward']:.3f}, rollout {metrics['rollout/tokens_per_s']:.1f} tokens/s; "
          f"adapter in {config.output_dir}")
    if before is not None:
        names = {"strict accuracy": "gsm8k_accuracy_reward", "format rate": "format_reward", "lenient accuracy": "gsm8k_last_number_reward"}
        changes = {label: paired_bootstrap(before[key], after[key], seed=config.seed) for label, key in names.items()}
        description = (f"the first {len(before['format_reward'])} GSM8K test problems, load_gsm8k('test') prompts, greedy, "
                       f"at most {config.max_completion_length} tokens")
        write_heldout(config.output_dir, description, changes)
        with open(Path(config.output_dir) / "heldout_completions.jsonl", "w") as f:  # what the numbers measured
            for i, question in enumerate(held_out["question"][: len(before["completion"])]):
                f.write(json.dumps({"question": question, "answer": held_out[i]["answer"], "before": before["completion"][i],
                                    "after": after["completion"][i]}) + "\n")
        print(f"held-out: {description}")
        print("\n".join(heldout_table({"metrics": {k: c.to_dict() for k, c in changes.items()}})))
    print(f"report: {render_training_report(config.output_dir)}")


if __name__ == "__main__":
    main()
