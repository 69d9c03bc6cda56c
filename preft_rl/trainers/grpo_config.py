"""PreftGRPOConfig: TRL's GRPOConfig field names where the meaning is the same, plus engine fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .grpo_core import IS_MODES, LOSS_TYPES, SCALE_REWARDS


@dataclass
class PreftGRPOConfig:
    output_dir: str = field(default="outputs/preft-grpo", metadata={"help": "Where checkpoints, logs and the final adapter go."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, adapter init and sampling seeds."})
    # --- batch sizes (TRL semantics) ---------------------------------------------------------
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt (the GRPO group size)."})
    num_iterations: int = field(default=1, metadata={"help": "Optimizer passes over each generated batch (mu)."})
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps to run."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Upper bound in epochs when max_steps <= 0."})
    # --- generation -------------------------------------------------------------------------
    max_prompt_length: int | None = field(default=512, metadata={"help": "Prompts longer than this are cut from the left."})
    max_completion_length: int = field(default=256, metadata={"help": "Tokens generated per completion at most."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs are taken after it)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling (None: off)."})
    # --- optimisation -----------------------------------------------------------------------
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of the adapter parameters."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (<= 0: off)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "A transformers scheduler name, e.g. 'cosine'."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of max_steps spent warming up."})
    # --- loss -------------------------------------------------------------------------------
    beta: float = field(default=0.0, metadata={"help": "KL coefficient against the base model (adapter off); 0: no reference pass."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping range of the ratio."})
    epsilon_high: float | None = field(default=None, metadata={"help": "Upper clipping range (default: epsilon; DAPO: 0.28)."})
    loss_type: str = field(default="dapo", metadata={"help": f"One of {LOSS_TYPES}."})
    scale_rewards: str = field(default="group", metadata={"help": f"One of {SCALE_REWARDS}."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function (default 1.0 each)."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "Correct the engine/trainer log-prob mismatch."})
    vllm_importance_sampling_mode: str = field(default="token_truncate", metadata={"help": f"One of {IS_MODES}."})
    vllm_importance_sampling_clip_max: float = field(default=3.0, metadata={"help": "Truncation of the importance weights."})
    # --- precision, logging, checkpoints -----------------------------------------------------
    bf16: bool = field(default=False, metadata={"help": "Train and serve in bf16 (the adapter stays fp32)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N steps."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate on eval_dataset every N steps (<= 0: only at the end)."})
    eval_max_prompts: int | None = field(default=None, metadata={"help": "Evaluate on at most this many eval prompts."})
    save_steps: int = field(default=50, metadata={"help": "Save a checkpoint every N steps (<= 0: only at the end)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    report_to: str | list[str] = field(default="none", metadata={"help": "'none', 'tensorboard', 'wandb' or a list."})
    disable_tqdm: bool = False
    # --- engine (PreftEngine / vLLM) --------------------------------------------------------
    engine_max_model_len: int | None = field(default=None, metadata={"help": "vLLM max_model_len (default: prompt + completion)."})
    engine_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM GPU share when colocated on CUDA."})
    engine_enforce_eager: bool = field(default=True, metadata={"help": "Run vLLM eagerly (no torch.compile / CUDA graphs)."})
    engine_sleep: bool = field(default=False, metadata={"help": "Put vLLM to sleep during the optimizer phase (CUDA)."})
    engine_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "Extra vLLM LLM(...) arguments."})

    def __post_init__(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"PreftGRPOConfig: {message}")

        need(self.num_generations >= 2, f"num_generations={self.num_generations} must be >= 2 (GRPO compares completions of one prompt)")
        need(self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1, "batch sizes must be >= 1")
        need(self.num_iterations >= 1, f"num_iterations={self.num_iterations} must be >= 1")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "set max_steps > 0 or num_train_epochs > 0")
        need(self.max_completion_length >= 1, f"max_completion_length={self.max_completion_length} must be >= 1")
        need(self.temperature > 0, f"temperature={self.temperature} must be > 0 (GRPO samples)")
        need(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        need(self.loss_type in LOSS_TYPES, f"loss_type={self.loss_type!r}: use one of {LOSS_TYPES}")
        if self.scale_rewards is True:
            self.scale_rewards = "group"
        elif self.scale_rewards is False:
            self.scale_rewards = "none"
        need(self.scale_rewards in SCALE_REWARDS, f"scale_rewards={self.scale_rewards!r}: use one of {SCALE_REWARDS}")
        need(self.vllm_importance_sampling_mode in IS_MODES, f"vllm_importance_sampling_mode: use one of {IS_MODES}")
        need(self.beta >= 0, f"beta={self.beta} must be >= 0")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        unknown = set(self.report_to) - {"tensorboard", "wandb"}
        need(not unknown, f"report_to={sorted(unknown)}: use 'none', 'tensorboard' or 'wandb'")
        import importlib.util

        for tracker in self.report_to:
            need(importlib.util.find_spec(tracker) is not None, f"report_to={tracker!r} but {tracker} is not installed; pip install {tracker}")

    def generation_batch_size(self, num_processes: int) -> int:
        """Completions generated per optimizer step over all processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes

    def check_batch(self, num_processes: int) -> None:
        """Each process generates whole groups (all num_generations completions of its prompts)."""
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if local % self.num_generations:
            valid = [n for n in range(2, local + 1) if local % n == 0]
            raise ValueError(
                f"PreftGRPOConfig: per_device_train_batch_size ({self.per_device_train_batch_size}) x "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) = {local} completions per process "
                f"per step must be divisible by num_generations={self.num_generations}; use num_generations in {valid} "
                "or change the batch sizes"
            )

    def describe(self, num_processes: int) -> str:
        total = self.generation_batch_size(num_processes)
        return (
            f"{num_processes} process(es) x {self.per_device_train_batch_size} completions x "
            f"{self.gradient_accumulation_steps} accumulation = {total} completions per step = "
            f"{total // self.num_generations} prompts x {self.num_generations} generations; "
            f"{self.max_steps} steps, {self.num_iterations} iteration(s) per batch"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
