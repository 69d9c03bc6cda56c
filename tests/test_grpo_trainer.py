"""PreftGRPOTrainer end to end on the tiny Llama (fp32, CPU, one process)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from datasets import Dataset

from preft_rl import PreftConfig, PreftGRPOConfig, PreftGRPOTrainer

pytest.importorskip("vllm")

WORDS = ["five apples and", "how many books", "she buys", "three cats then", "each market"]


def dataset(chat: bool, n: int = 32) -> Dataset:
    rows = []
    for i in range(n):
        text = f"{WORDS[i % len(WORDS)]} {i} pears?"
        rows.append({"prompt": [{"role": "user", "content": text}] if chat else text, "answer": f"#### {i}"})
    return Dataset.from_list(rows)


def first_token_even(prompts, completions, completion_ids=None, **columns):
    assert len(columns["answer"]) == len(completions)  # dataset columns reach the reward function
    return [float(bool(ids) and ids[0] % 2 == 0) for ids in completion_ids]


def config(tmp_path, **overrides) -> PreftGRPOConfig:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=8,
        max_steps=4, max_completion_length=4, learning_rate=3e-2, save_steps=0, disable_tqdm=True,
        engine_kwargs={"max_num_batched_tokens": 256},
    )
    settings.update(overrides)
    return PreftGRPOConfig(**settings)


def assert_engine_serves(trainer, reference_model, prompts, max_tokens: int = 6) -> None:
    """After a sync, the engine's greedy tokens for each prompt equal `reference_model.generate`'s (a PreftModel, or a
    PEFT twin): the engine serves exactly the trained policy adapter."""
    from preft_rl.engine import SamplingParams
    from preft_rl.trainers.rollout import prompt_ids_for

    trainer._sync_engine()
    reference_model.generation_config.eos_token_id = None
    for prompt in prompts:
        ids = prompt_ids_for(trainer.engine.tokenizer, prompt, None)
        served = trainer.engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), adapters=["policy"])
        reference = reference_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):]
        assert list(served[0].outputs[0].token_ids) == reference.tolist()


def even_mass(trainer: PreftGRPOTrainer, rows: Dataset) -> float:
    """Mean probability the policy gives to an even first completion token (exact, not sampled)."""
    from preft_rl.trainers.rollout import prompt_ids_for

    model = trainer.preft_model
    total = 0.0
    with torch.no_grad():
        for prompt in rows["prompt"]:
            ids = torch.tensor([prompt_ids_for(trainer.engine.tokenizer, prompt, None)])
            logits = model(input_ids=ids, prompt_mask=torch.ones_like(ids, dtype=torch.bool)).logits[0, -1]
            total += torch.softmax(logits.float(), -1)[0::2].sum().item()
    return total / len(rows)


# Learning tests average the gain over several seeds: one short RL run's gain depends on its seed and on the CPU's
# kernels (measured: GRPO LoRA gains 0.045-0.48 over seeds 0-4, and 0.045 vs 0.169 for the same seed under AVX2 and
# AVX-512 kernels), so a single seed's threshold fails on some machines. Thresholds sit at about half the measured mean
# of seeds 0-2 (same under AVX2 and AVX-512 kernels), about two standard deviations of a three-seed mean below it.
LEARNING_SEEDS = (0, 1, 2)


def mean_gain(first_gain: float, gain_of_seed, seeds=LEARNING_SEEDS) -> float:
    """The mean of a seed-0 run's gain (measured by the test itself) and `gain_of_seed(seed)` for the other seeds."""
    gains = [first_gain] + [gain_of_seed(seed) for seed in seeds[1:]]
    return sum(gains) / len(gains)


def even_mass_gain(trainer_cls, model_dir, reward, train, preft, args) -> float:
    """even_mass after training minus before, for one short run."""
    trainer = trainer_cls(str(model_dir), reward, args=args, train_dataset=train, preft_config=preft)
    try:
        before = even_mass(trainer, train.select(range(8)))
        trainer.train()
        return even_mass(trainer, train.select(range(8))) - before
    finally:
        trainer.close()


@pytest.mark.parametrize("method,chat", [("lora", True), ("loreft", False)])
def test_grpo_learns_and_keeps_its_invariants(tiny_llama_dir, tmp_path, method, chat):
    preft = PreftConfig(method="lora", r=4) if method == "lora" else PreftConfig(method="loreft", r=4, positions="f2+l2")
    train = dataset(chat)
    trainer = PreftGRPOTrainer(
        str(tiny_llama_dir), first_token_even, args=config(tmp_path, max_steps=16, gradient_accumulation_steps=2, num_generations=4), train_dataset=train, preft_config=preft
    )
    assert preft.seed is None and trainer.preft_model.preft_config.seed == 0  # the caller's config is copied, not changed
    try:
        base_before = {n: p.detach().clone() for n, p in trainer.preft_model.base_model.named_parameters() if not p.requires_grad}
        engine_weight = next(trainer.engine._runner.model.parameters()).detach().clone()
        # trainer log-probs on the engine's own token ids agree with the engine's (processed) log-probs
        batch, _ = trainer._generate_and_score(0)
        trainer_logps = trainer._logps_no_grad(batch)
        gap = (trainer_logps - batch.engine_logps)[batch.completion_mask].abs().max().item()
        assert gap < 1e-4, gap  # fp32 on both sides; measured ~1e-6
        before = even_mass(trainer, train.select(range(8)))
        syncs = []
        original = trainer.engine.update_adapter
        trainer.engine.update_adapter = lambda name, state: (syncs.append(set(state)), original(name, state))[1]
        metrics = trainer.train()
        after = even_mass(trainer, train.select(range(8)))
        engine_weight_after = next(trainer.engine._runner.model.parameters()).detach().clone()
        # after a sync the engine serves exactly the trained adapter: greedy output equals PreftModel.generate
        trainer.engine.update_adapter = original  # stop counting: this sync is the test's own
        assert_engine_serves(trainer, trainer.preft_model.eval(), train["prompt"][:3])
    finally:
        trainer.close()
    # GRPO moved probability onto rewarded first tokens (mean of seeds 0-2 measured: LoRA 0.33, LoReFT 0.16)
    learning_args = dict(max_steps=16, gradient_accumulation_steps=2, num_generations=4)
    gain = mean_gain(after - before, lambda seed: even_mass_gain(PreftGRPOTrainer, tiny_llama_dir, first_token_even, train, preft,
                                                                 config(tmp_path / f"seed{seed}", seed=seed, **learning_args)))
    assert gain > (0.15 if method == "lora" else 0.08), (before, after, gain)
    # only adapter tensors ever went to the engine, once per new rollout; its base weights never changed
    adapter_keys = set(trainer.preft_model.adapter_state_dict())
    # 15 rollouts after an update, and one more before the final save (a policy is written only once it serves)
    assert len(syncs) == 16 and all(keys == adapter_keys for keys in syncs)
    assert torch.equal(engine_weight_after, engine_weight)
    for name, param in trainer.preft_model.base_model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 17))
    for key in ("reward", "reward_std", "rewards/first_token_even/mean", "completions/mean_length", "kl", "clip_ratio",
                "entropy", "time/generate", "time/score", "time/forward", "time/backward", "time/optimizer", "time/update",
                "rollout/tokens_per_s", "memory/update_gib", "memory/forward_gib", "memory/backward_gib"):
        assert key in metrics and key in log[-1], key
    for row in log:  # the update's phases are parts of it; its memory is the largest of theirs
        assert row["time/forward"] + row["time/backward"] + row["time/optimizer"] <= row["time/update"] <= row["time/step"]
        assert row["memory/update_gib"] >= max(row["memory/forward_gib"], row["memory/backward_gib"])
    # peak memory per phase: the rollout phase on steps that generate, the update phase on every step (CPU: VmHWM)
    assert all(0.1 < row["memory/update_gib"] < 24 for row in log)
    assert all(row["memory/rollout_gib"] >= row["memory/generate_gib"] for row in log if "memory/rollout_gib" in row)
    rollouts = sum((row["step"] - 1) % trainer.args.steps_per_generation == 0 for row in log)
    assert sum("memory/rollout_gib" in row for row in log) == rollouts and all(0.1 < row.get("memory/rollout_gib", 1) < 24 for row in log)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "checkpoint-16").is_dir()


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    """4 steps straight vs 3 steps + crash + resume: identical adapter parameters (fp32, CPU)."""
    preft = PreftConfig(method="lora", r=4)
    args = dict(max_steps=4, num_iterations=2, save_steps=1, beta=0.05, loss_type="grpo")
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    trainer = PreftGRPOTrainer(str(tiny_llama_dir), first_token_even, args=config(straight_dir, **args),
                               train_dataset=dataset(False), preft_config=preft)
    try:
        trainer.train()
        straight = {k: v.clone() for k, v in trainer.preft_model.adapter_state_dict().items()}
    finally:
        trainer.close()
    # a run that "crashed" after step 3: only its checkpoints up to 3 exist (3 is mid-way through a rollout)
    resumed_dir.mkdir()
    for step in (1, 2, 3):
        shutil.copytree(straight_dir / f"checkpoint-{step}", resumed_dir / f"checkpoint-{step}")
    log_lines = (straight_dir / "log.jsonl").read_text().splitlines()
    # includes step 4, which is redone, and a line a kill cut short mid-append
    (resumed_dir / "log.jsonl").write_text("\n".join(log_lines) + "\n" + log_lines[-1][:20])
    trainer = PreftGRPOTrainer(str(tiny_llama_dir), first_token_even, args=config(resumed_dir, **args),
                               train_dataset=dataset(False), preft_config=preft)
    try:
        trainer.train(resume_from_checkpoint=True)
        resumed = trainer.preft_model.adapter_state_dict()
    finally:
        trainer.close()
    assert set(straight) == set(resumed)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (resumed_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"= 6 completions per process per step must be divisible by num_generations=4; use num_generations in \[2, 3, 6\]"):
        PreftGRPOConfig(per_device_train_batch_size=3, gradient_accumulation_steps=2, num_generations=4).check_batch(1)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        PreftGRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="num_generations=1 must be >= 2"):
        PreftGRPOConfig(num_generations=1)
    assert PreftGRPOConfig(scale_rewards=False).scale_rewards == "none"
    with pytest.raises(ValueError, match="set max_steps > 0"):
        PreftGRPOConfig(max_steps=0, num_train_epochs=0)
    # max_steps <= 0: num_train_epochs passes over the prompts (8 completions per step = 2 prompts x 4 here)
    epochs = PreftGRPOConfig(max_steps=0, num_train_epochs=1.5, per_device_train_batch_size=8, num_generations=4)
    assert epochs.resolved_max_steps(num_prompts=10, num_processes=1) == 8  # ceil(1.5 * 10 / 2)
    assert epochs.resolved_max_steps(num_prompts=10, num_processes=2) == 4
    assert PreftGRPOConfig(max_steps=0, num_train_epochs=1, num_generations=4, num_iterations=2).resolved_max_steps(8, 1) == 8
    with pytest.raises(ValueError, match="report_to=\\['mlflow'\\]"):
        PreftGRPOConfig(report_to="mlflow")


def test_evaluate_scores_greedy_completions_and_tensorboard_logs(tiny_llama_dir, tmp_path):
    from preft_rl.trainers.rollout import prompt_ids_for

    eval_rows = dataset(True, n=6)
    trainer = PreftGRPOTrainer(
        str(tiny_llama_dir), first_token_even, args=config(tmp_path, max_steps=2, eval_steps=1, report_to="tensorboard"),
        train_dataset=dataset(True), eval_dataset=eval_rows, preft_config=PreftConfig(method="lora", r=4),
    )
    try:
        trainer.train()
        metrics = trainer.evaluate()
        scores = trainer.evaluation_scores()  # per problem, in dataset order
        subset = trainer.evaluation_scores(dataset=eval_rows.select([4, 5]))
        model = trainer.preft_model
        model.base_model.generation_config.eos_token_id = None
        expected = []
        for prompt in eval_rows["prompt"]:
            ids = torch.tensor([prompt_ids_for(trainer.engine.tokenizer, prompt, None)])
            first = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)[0, -1].item()
            expected.append(float(first % 2 == 0))
    finally:
        trainer.close()
    assert metrics["eval/num_prompts"] == 6
    assert scores["first_token_even"] == expected and len(scores["completion"]) == 6
    assert subset["first_token_even"] == expected[4:] and subset["completion"] == scores["completion"][4:]
    assert metrics["eval/rewards/first_token_even/mean"] == pytest.approx(sum(expected) / 6)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum("eval/reward" in row for row in log) == 3  # after step 1, at the end of training, and the call above
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no tensorboard event file"


def test_wandb_tracker_logs_offline(tiny_llama_dir, tmp_path, monkeypatch):
    """report_to="wandb" under WANDB_MODE=offline: the run's metrics land in a local wandb run folder."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = PreftGRPOTrainer(
        str(tiny_llama_dir), first_token_even, args=config(tmp_path / "out", max_steps=2, report_to="wandb"),
        train_dataset=dataset(False), preft_config=PreftConfig(method="lora", r=4),
    )
    try:
        trainer.train()
    finally:
        trainer.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))[:20]
    (history,) = runs[0].glob("*.wandb")  # the run's records (protobuf); offline runs write no summary json
    records = history.read_bytes()
    for key in (b"rewards/first_token_even/mean", b"time/generate", b"rollout/tokens_per_s", b"learning_rate"):
        assert key in records, key
