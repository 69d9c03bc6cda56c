"""Run by tests/test_grpo_distributed.py under `accelerate launch` / `torchrun`: 3 GRPO (or, with PREFT_CHECK_ALGO=ppo,
PPO) steps on the tiny Llama; every rank prints a digest of what it trained so the test can check the ranks agree.
With PREFT_CHECK_TENANTS=1: GRPO with two tenants, 't0' (this run's data and reward, so it must equal the plain run)
and 't1' (other prompts, the opposite reward), written to OUTPUT_DIR/tenants/. With PREFT_CHECK_TENANTS=3: a third,
't2' (other prompts, this run's reward), 2 tenants per step (round robin: t0 trains at steps 0, 1 and 3 of 4, so it
must still equal the 3-step plain run) and one tenant's rows per forward (every micro-batch in two pieces).
PREFT_CHECK_MAX_GRAD_NORM sets max_grad_norm (default 1.0). With PREFT_CHECK_TOOLS=1 (MODEL_DIR: the tool model of
conftest.tool_model_dir): GRPO with tools=[add] on its question, multi-turn rollouts whose trajectories end at
different rounds in each process.

Usage: python distributed_train_check.py MODEL_DIR OUTPUT_DIR [MAX_STEPS SAVE_STEPS [resume]]
"""

import hashlib
import os
import sys

if __name__ == "__main__":
    from datasets import Dataset

    from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer, PreftPPOConfig, PreftPPOTrainer, Tenant
    from preft_rl.trainers.runtime import gathered as _gathered

    rows = [{"prompt": f"five apples and {i} pears?", "answer": f"#### {i}"} for i in range(32)]

    def first_token_even(prompts, completions, completion_ids=None, **columns):
        return [float(bool(c) and c[0] % 2 == 0) for c in completion_ids]

    def first_token_odd(prompts, completions, completion_ids=None, **columns):
        return [float(bool(c) and c[0] % 2 == 1) for c in completion_ids]

    max_steps, save_steps = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (3, 0)
    common = dict(
        output_dir=sys.argv[2], per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
        max_steps=max_steps, max_completion_length=4, learning_rate=3e-2, save_steps=save_steps, disable_tqdm=True,
        engine_kwargs={"max_num_batched_tokens": 256},
        engine_tensor_parallel_size=int(os.environ.get("PREFT_CHECK_ENGINE_TP", "1")),
        max_grad_norm=float(os.environ.get("PREFT_CHECK_MAX_GRAD_NORM", "1.0")),
    )
    ppo = os.environ.get("PREFT_CHECK_ALGO") == "ppo"
    trainer_class = PreftPPOTrainer if ppo else PreftGRPOTrainer
    args = PreftPPOConfig(**common, num_ppo_epochs=2, critic_learning_rate=3e-2) if ppo else PreftGRPOConfig(**common)
    tenant_count = int(os.environ.get("PREFT_CHECK_TENANTS", "0"))
    if os.environ.get("PREFT_CHECK_TOOLS") == "1":
        def add(a: int, b: int) -> int:
            """Add two integers.

            Args:
                a: The first number.
                b: The second number.
            """
            return a + b

        question = [{"role": "user", "content": "add 2 and 3"}]
        args = PreftGRPOConfig(**{**common, "max_completion_length": 128, "max_steps": 2}, temperature=1.2,
                               max_tool_calling_iterations=2)
        trainer = PreftGRPOTrainer(sys.argv[1], first_token_even, args=args, preft_config=PreftConfig(method="lora", r=4),
                                   train_dataset=Dataset.from_list([{"prompt": question, "tag": i} for i in range(16)]),
                                   tools=[add])
    elif tenant_count:
        other = [{"prompt": f"how many books {i}?", "answer": f"#### {i}"} for i in range(20)]
        tenants = [Tenant("t0", Dataset.from_list(rows), first_token_even), Tenant("t1", Dataset.from_list(other), first_token_odd)]
        if tenant_count == 3:
            third = [{"prompt": f"seven cats and {i} dogs?", "answer": f"#### {i}"} for i in range(20)]
            tenants.append(Tenant("t2", Dataset.from_list(third), first_token_even))
            args = PreftGRPOConfig(**{**common, "max_steps": 4}, tenants_per_step=2, tenants_per_forward=1,
                                   tenant_offload=os.environ.get("PREFT_CHECK_TENANT_OFFLOAD") or None)
        trainer = PreftGRPOTrainer(sys.argv[1], args=args, preft_config=PreftConfig(method="lora", r=4), tenants=tenants)
    else:
        trainer = trainer_class(sys.argv[1], first_token_even, args=args, train_dataset=Dataset.from_list(rows),
                                preft_config=PreftConfig(method="lora", r=4))
    trainer.train(resume_from_checkpoint=True if sys.argv[-1] == "resume" else None)
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:  # outside a gather the adapter is ZeRO-3 shards
        try:
            trainer.preft_model.adapter_state_dict()
        except RuntimeError as err:
            assert "GatheredParameters" in str(err), err
            print("ZERO3 UNGATHERED STATE REFUSED", flush=True)
    extra = trainer._checkpoint_state()  # PPO: the critic adapter and the value head
    with _gathered([p for _, p in trainer.preft_model.adapter_named_parameters()] + list(extra.values()), trainer.accelerator):
        if hasattr(trainer, "tenant_names"):  # every tenant's adapter (in the model or offloaded), under 'tenant/key'
            state = {f"{name}/{k}": v for name in trainer.tenant_names for k, v in trainer._adapter(name).adapter_state_dict().items()}
        else:
            state = trainer.preft_model.adapter_state_dict()
        state.update({k: v.detach() for k, v in extra.items()})
        if extra and trainer.accelerator.is_main_process:  # what PPO trained beside the policy, for the test to compare
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().clone() for k, v in extra.items()}, f"{sys.argv[2]}/critic_final.safetensors")
        digest = hashlib.sha256(b"".join(state[k].float().numpy().tobytes() for k in sorted(state))).hexdigest()[:16]
    # One write per line: both ranks share torchrun's stdout, and print() writes the newline separately.
    engine_tp = trainer.engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    sys.stdout.write(f"RANK {trainer.accelerator.process_index} OF {trainer.accelerator.num_processes} "
                     f"{type(trainer.model).__name__} ADAPTER {digest} ENGINE TP {engine_tp}\n")
    sys.stdout.flush()
    trainer.close()
