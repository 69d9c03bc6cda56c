"""Named GRPO settings shared by the example, the study and the docs (so they cannot drift apart).

`GSM8K_CPU` is the CPU-sized main job on the offline default model; the reasons and the measured effect of
each value are in examples/grpo_gsm8k.py's docstring.
"""

GSM8K_CPU = dict(
    max_steps=6, num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
    max_prompt_length=384, max_completion_length=160, learning_rate=1e-3, temperature=0.7, beta=0.04,
)
