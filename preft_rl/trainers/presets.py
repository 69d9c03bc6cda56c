"""Named GRPO and PPO settings shared by the examples, the study and the docs (so they cannot drift apart).

`GSM8K_CPU` is the CPU-sized main job on the offline default model; the reasons and the measured effect of
each value are in examples/grpo_gsm8k.py's docstring.
"""

GSM8K_CPU = dict(
    max_steps=6, num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
    max_prompt_length=384, max_completion_length=160, learning_rate=1e-3, temperature=0.7, beta=0.04,
)

# PPO's own fields for the CPU-sized runs; everything else (batches, generation, learning rate) is GSM8K_CPU's, and
# GRPO's beta becomes PPO's kl_coef. Two epochs per rollout keep a PPO step within ~2x a GRPO step on 2 cores.
PPO_CPU = dict(num_ppo_epochs=2, num_mini_batches=1, critic_learning_rate=3e-3)


def ppo_from_grpo(grpo_settings: dict) -> dict:
    """PreftPPOConfig settings for a run comparable with a GRPO run: the shared fields as they are (batches,
    prompts x completions, generation, learning rate), GRPO's beta as PPO's kl_coef (TRL's k1 KL in the reward),
    GRPO-only fields dropped, then PPO_CPU."""
    import dataclasses

    from .ppo_config import PreftPPOConfig

    names = {f.name for f in dataclasses.fields(PreftPPOConfig)}
    settings = {k: v for k, v in grpo_settings.items() if k in names}
    if "beta" in grpo_settings:
        settings["kl_coef"] = grpo_settings["beta"]
    return {**settings, **PPO_CPU}
