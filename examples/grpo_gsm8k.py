"""GRPO fine-tuning of a prefill-only adapter on GSM8K, rolling out with the colocated PreftEngine.

    bash scripts/setup.sh && .venv/bin/accelerate launch examples/grpo_gsm8k.py          # CPU: ~5 min, default model
    .venv/bin/python examples/grpo_gsm8k.py --method loreft --r 8 --max-steps 50        # a plain process works too
    ACCELERATE_USE_CPU=true .venv/bin/torchrun --nproc_per_node 2 examples/grpo_gsm8k.py  # two CPU processes
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/grpo_gsm8k.py \
        --model Qwen/Qwen2.5-1.5B-Instruct --bf16 --max-steps 500                         # GPUs

Data: --data PATH (a GSM8K jsonl or a folder with train.jsonl), else ../shared/data/gsm8k when present,
else the hub's openai/gsm8k, else GSM8K-style problems generated offline (reasoning-gym).
Outputs in --output-dir: log.jsonl (per-step metrics), checkpoint-N/, and the final adapter files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer
from preft_rl.data import load_gsm8k
from preft_rl.models import DEFAULT_MODEL
from preft_rl.rewards import format_reward, gsm8k_accuracy_reward

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data", default=None)
    parser.add_argument("--method", default="lora", choices=["lora", "loreft", "direft"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--positions", default="f5+l5", help="ReFT positions ('all' or 'fN+lM')")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--per-device-train-batch-size", type=int, default=8)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--loss-type", default="dapo", choices=["grpo", "dr_grpo", "dapo"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="outputs/grpo-gsm8k")
    parser.add_argument("--report-to", default="none")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    source = args.data or (SHARED_GSM8K if SHARED_GSM8K.is_dir() else "auto")
    train = load_gsm8k("train", source=source, shuffle=True, seed=args.seed)
    if args.method == "lora":
        preft = PreftConfig(method="lora", r=args.r, alpha=2 * args.r, target_modules="all-linear")
    else:
        preft = PreftConfig(method=args.method, r=args.r, positions=args.positions)
    config = PreftGRPOConfig(
        output_dir=args.output_dir,
        seed=args.seed,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_generations=args.num_generations,
        max_steps=args.max_steps,
        max_prompt_length=384,
        max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate,
        beta=args.beta,
        loss_type=args.loss_type,
        bf16=args.bf16,
        save_steps=args.save_steps,
        report_to=args.report_to,
    )
    trainer = PreftGRPOTrainer(
        args.model, [gsm8k_accuracy_reward, format_reward], args=config, train_dataset=train, preft_config=preft
    )
    try:
        metrics = trainer.train(resume_from_checkpoint=args.resume or None)
    finally:
        trainer.close()
    if trainer.accelerator.is_main_process:
        print(
            f"\nfinal step {metrics['step']}: reward {metrics['reward']:.3f}, "
            f"accuracy {metrics['rewards/gsm8k_accuracy_reward/mean']:.3f}, format {metrics['rewards/format_reward/mean']:.3f}, "
            f"rollout {metrics['rollout/tokens_per_s']:.1f} tokens/s; adapter in {args.output_dir}"
        )


if __name__ == "__main__":
    main()
