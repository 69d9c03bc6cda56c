"""PPO fine-tuning of a prefill-only adapter on GSM8K: the policy is a PreFT adapter, the critic a second
(all-token LoRA) adapter plus a value head on the same frozen base; rollouts use the colocated PreftEngine.

CPU (the offline default model, 2 cores):
    bash scripts/setup.sh && .venv/bin/accelerate launch --config_file examples/accelerate_configs/cpu.yaml examples/ppo_gsm8k.py
    .venv/bin/python examples/ppo_gsm8k.py --kl-penalty loss --num-ppo-epochs 1        # a plain process works too
One GPU:
    accelerate launch --num_processes 1 examples/ppo_gsm8k.py --model Qwen/Qwen2.5-1.5B-Instruct --bf16 --max-steps 300 \\
        --per-device-train-batch-size 16 --gradient-accumulation-steps 4 --num-generations 1
8 GPUs, DeepSpeed ZeRO-3 (policy adapter, critic adapter and value head are sharded; only the policy is gathered
for the engine sync):
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml --num_processes 8 \\
        examples/ppo_gsm8k.py --model Qwen/Qwen2.5-7B-Instruct --bf16 --max-steps 500 --num-generations 1

The held-out protocol, the data sources, the prompt and the outputs are those of examples/grpo_gsm8k.py (200 GSM8K
test problems, greedy, strict / format / lenient with 95% paired-bootstrap intervals; report.md, heldout.json).
The defaults are the GRPO example's shared settings (4 prompts x 4 completions per step, 160 tokens, lr 1e-3,
T 0.7) with GRPO's beta as kl_coef (TRL's k1 KL in each token's reward) and PPO_CPU's fields (2 PPO epochs per
rollout, critic lr 3e-3): `preft_rl/trainers/presets.py`. The critic is an all-token LoRA r=8 on every linear layer
(`PreftPPOTrainer(..., critic_config=PreftConfig(...))` in Python to change it). Every PreftPPOConfig field with a
simple type is a flag (--kl-coef, --vf-coef, --gamma, --lam, --cliprange, --critic-warmup-steps, ...).
"""

from __future__ import annotations

import sys

from grpo_gsm8k import run_job

from preft_rl.console import quiet_libraries
from preft_rl.trainers.presets import GSM8K_CPU, ppo_from_grpo

EXAMPLE_DEFAULTS = ppo_from_grpo(dict(output_dir="outputs/ppo-gsm8k", save_steps=5, **GSM8K_CPU))


def main(argv: list[str] | None = None) -> None:
    quiet_libraries(verbose="--verbose" in (argv if argv is not None else sys.argv))  # before vLLM is imported
    from preft_rl import PreftPPOConfig, PreftPPOTrainer

    run_job(PreftPPOTrainer, PreftPPOConfig, EXAMPLE_DEFAULTS, __doc__, argv)


if __name__ == "__main__":
    main()
