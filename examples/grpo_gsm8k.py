"""GRPO fine-tuning of a prefill-only adapter on GSM8K, rolling out with the colocated PreftEngine.

CPU (the offline default model, ~5 min on 2 cores):
    bash scripts/setup.sh && .venv/bin/accelerate launch --config_file examples/accelerate_configs/cpu.yaml examples/grpo_gsm8k.py
    .venv/bin/python examples/grpo_gsm8k.py --method loreft --r 8 --positions f5+l5     # a plain process works too
    ACCELERATE_USE_CPU=true .venv/bin/torchrun --nproc_per_node 2 examples/grpo_gsm8k.py  # two CPU processes
One GPU:
    accelerate launch --num_processes 1 examples/grpo_gsm8k.py --model Qwen/Qwen2.5-1.5B-Instruct --bf16 --max-steps 300
8 GPUs, DeepSpeed ZeRO-3:
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        examples/grpo_gsm8k.py --model Qwen/Qwen2.5-7B-Instruct --bf16 --max-steps 500

Held-out protocol (printed before and after training): the first --eval-problems GSM8K test problems,
the same prompts, greedy decoding, scored strictly ('#### N' or \\boxed{N} must equal the answer) and
leniently (the last number in the completion must equal the answer).
Data: --data (a GSM8K jsonl or a folder with train.jsonl/test.jsonl), else ../shared/data/gsm8k when
present, else the hub's openai/gsm8k, else GSM8K-style problems generated offline (reasoning-gym).
Every PreftGRPOConfig field with a simple type is a flag (--learning-rate, --beta, --loss-type, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer
from preft_rl.data import load_gsm8k
from preft_rl.models import DEFAULT_MODEL
from preft_rl.rewards import format_reward, gsm8k_accuracy_reward, gsm8k_last_number_reward
from preft_rl.trainers.cli_args import add_dataclass_arguments, dataclass_from_args

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
# Defaults of this example (a CPU-sized run); every one is a flag.
EXAMPLE_DEFAULTS = dict(
    output_dir="outputs/grpo-gsm8k", max_steps=10, num_generations=4, per_device_train_batch_size=8,
    max_prompt_length=384, max_completion_length=128, learning_rate=2e-4, save_steps=5,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default=None)
    parser.add_argument("--method", default="lora", choices=["lora", "loreft", "direft"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--positions", default="f5+l5", help="ReFT positions ('all' or 'fN+lM')")
    parser.add_argument("--eval-problems", type=int, default=50, help="held-out GSM8K test problems (0: skip)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    add_dataclass_arguments(parser, PreftGRPOConfig, EXAMPLE_DEFAULTS)
    args = parser.parse_args()
    config = dataclass_from_args(PreftGRPOConfig, args)

    source = args.data or (SHARED_GSM8K if SHARED_GSM8K.is_dir() else "auto")
    train = load_gsm8k("train", source=source, shuffle=True, seed=config.seed)
    held_out = load_gsm8k("test", source=source, num_examples=args.eval_problems) if args.eval_problems else None
    if args.method == "lora":
        preft = PreftConfig(method="lora", r=args.r, alpha=2 * args.r, target_modules="all-linear")
    else:
        preft = PreftConfig(method=args.method, r=args.r, positions=args.positions)
    trainer = PreftGRPOTrainer(
        args.model, [gsm8k_accuracy_reward, format_reward], args=config, train_dataset=train, eval_dataset=held_out, preft_config=preft
    )
    protocol = [gsm8k_accuracy_reward, gsm8k_last_number_reward]
    try:
        before = trainer.evaluate(protocol, log=False) if held_out is not None else None
        metrics = trainer.train(resume_from_checkpoint=args.resume or None)
        after = trainer.evaluate(protocol, log=False) if held_out is not None else None
    finally:
        trainer.close()
    if not trainer.accelerator.is_main_process:
        return
    print(f"\nstep {metrics['step']}: train reward {metrics['reward']:.3f}, rollout {metrics['rollout/tokens_per_s']:.1f} tokens/s; "
          f"adapter in {config.output_dir}")
    if before is not None:
        strict, lenient = "eval/rewards/gsm8k_accuracy_reward/mean", "eval/rewards/gsm8k_last_number_reward/mean"
        print(f"held-out GSM8K ({int(after['eval/num_prompts'])} test problems, greedy):")
        print(f"  strict  ('#### N') accuracy: {before[strict]:.3f} -> {after[strict]:.3f}")
        print(f"  lenient (last number) accuracy: {before[lenient]:.3f} -> {after[lenient]:.3f}")


if __name__ == "__main__":
    main()
