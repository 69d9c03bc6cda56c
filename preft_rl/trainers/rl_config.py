"""PreftRLConfig: the settings every RL trainer shares (batches, generation, optimiser, logging, engine).

Field names follow TRL's configs where the meaning is the same. Algorithm configs (`PreftGRPOConfig`,
`PreftPPOConfig`) subclass it and add their own loss fields; every value is checked once, here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .grpo_core import IS_MODES

TENANT_SAMPLING = ("round_robin", "random")
TENANT_OFFLOAD = (None, "cpu", "disk")


@dataclass
class PreftRLConfig:
    output_dir: str = field(default="outputs/preft-rl", metadata={"help": "Where checkpoints, logs and the final adapter go."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, adapter init and sampling seeds."})
    # --- batch sizes (TRL semantics) ---------------------------------------------------------
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt."})
    max_steps: int = field(default=100, metadata={"help": "Training steps to run (<= 0: num_train_epochs decides)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over train_dataset's prompts, used when max_steps <= 0."})
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
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of the optimizer steps spent warming up."})
    dynamic_sampling: bool = field(default=False, metadata={
        "help": "DAPO's dynamic sampling: drop groups whose rewards all agree (zero variance, no learning signal) and draw "
                "more prompts until the batch is full or max_dynamic_sampling_draws is reached."})
    max_dynamic_sampling_draws: int = field(default=4, metadata={
        "help": "Generation rounds per rollout at most with dynamic_sampling (the first included); a batch still short "
                "after them is filled with dropped groups (advantage 0) and a warning."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function (default 1.0 each)."})
    vllm_importance_sampling_correction: bool = field(default=True, metadata={"help": "Correct the engine/trainer log-prob mismatch."})
    vllm_importance_sampling_mode: str = field(default="token_truncate", metadata={"help": f"One of {IS_MODES}."})
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata={"help": "Lower bound of the importance weights (None: none)."})
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata={"help": "Upper bound of the importance weights (None: none)."})
    # --- precision, logging, checkpoints -----------------------------------------------------
    bf16: bool = field(default=False, metadata={"help": "Train and serve in bf16 (the adapter stays fp32)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    share_prompt_forward: bool = field(default=True, metadata={"help": "Compute each distinct prompt once per training micro-batch "
                                                                      "(exact for prefill-only adapters; a group's completions share it)."})
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
    engine_tensor_parallel_size: int = field(default=1, metadata={
        "help": "Shard the colocated engine over groups of this many consecutive processes (vLLM's external_launcher, "
                "as TRL's vllm_tensor_parallel_size): each group generates its ranks' prompts together."})

    tenants_per_step: int | None = field(default=None, metadata={
        "help": "With tenants=: how many tenants each step trains (None: all of them)."})
    tenants_per_forward: int | None = field(default=None, metadata={
        "help": "With tenants=: how many tenants' rows one training forward and backward holds (None: every picked "
                "tenant's rows in one). Activation memory grows with it, not with the tenant count; the update is the same "
                "either way (each tenant's loss uses only its own rows). Not under DeepSpeed (use gradient_checkpointing "
                "there)."})
    tenant_sampling: str = field(default="round_robin", metadata={
        "help": "With tenants= and tenants_per_step: 'round_robin' (in turn, in the order given) or 'random' (seeded by "
                "seed and step)."})
    tenant_offload: str | None = field(default=None, metadata={
        "help": "With tenants= and tenants_per_step: where the tenants not picked for a step keep their adapter and AdamW "
                "state. None: every tenant in the model and optimizer (memory grows with the tenant count); 'cpu': host "
                "memory; 'disk': one file per tenant in tenant_offload_dir. With 'cpu' or 'disk' the model, optimizer and "
                "engine hold only tenants_per_step tenants; the training is the same bit for bit."})
    tenant_offload_dir: str | None = field(default=None, metadata={
        "help": "With tenant_offload='disk': the folder of the tenants' state files (default <output_dir>/tenant_state)."})

    # --- multi-turn tools (trainer(..., tools=[...] or environment_factory=...); TRL's names) -----------
    max_tool_calling_iterations: int = field(default=4, metadata={
        "help": "With tools: tool-calling rounds per trajectory at most (a turn after the last round's results still "
                "runs; its tool calls are not)."})
    tool_call_timeout: float = field(default=10.0, metadata={
        "help": "With tools: seconds one tool call may take; a slower one becomes a tool message saying so."})
    max_tool_response_length: int = field(default=256, metadata={
        "help": "With tools: tokens of one tool result at most; a longer one is cut, and its message says so."})

    # --- online personalisation: push saved adapters into a running `preft-rl serve` ---------------------
    push_to_server: str | None = field(default=None, metadata={
        "help": "Base URL of a running `preft-rl serve --enable-adapter-updates` (e.g. http://127.0.0.1:8000): after every "
                "save (checkpoints and the final adapter) the trained adapter(s) are loaded into it in place, so users get "
                "the new version without a restart; requests already running finish on the old one."})
    push_api_key: str | None = field(default=None, metadata={
        "help": "The server's API key (default: the VLLM_API_KEY environment variable)."})
    push_adapter_name: str | None = field(default=None, metadata={
        "help": "The served name of a single-adapter run's adapter (default: output_dir's folder name); with tenants= "
                "each tenant is served under its own name."})

    min_generations = 1  # GRPO needs a group of at least 2

    def _need(self, condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"{type(self).__name__}: {message}")

    def __post_init__(self) -> None:
        need = self._need
        for f in dataclasses.fields(self):  # every number finite: a NaN learning rate or KL weight trains on garbage
            value = getattr(self, f.name)
            if isinstance(value, float):
                need(math.isfinite(value), f"{f.name}={value} must be a finite number")
        need(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be > 0")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.num_generations >= self.min_generations,
             f"num_generations={self.num_generations} must be >= {self.min_generations}")
        need(self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1, "batch sizes must be >= 1")
        need(self.max_steps > 0 or self.num_train_epochs > 0,
             f"max_steps={self.max_steps} and num_train_epochs={self.num_train_epochs}: set max_steps > 0 (or max_steps <= 0 "
             "with num_train_epochs > 0)")
        need(self.max_completion_length >= 1, f"max_completion_length={self.max_completion_length} must be >= 1")
        need(self.engine_tensor_parallel_size >= 1, f"engine_tensor_parallel_size={self.engine_tensor_parallel_size} must be >= 1")
        need(self.temperature > 0, f"temperature={self.temperature} must be > 0 (RL samples its completions)")
        need(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
        need(self.vllm_importance_sampling_mode in IS_MODES, f"vllm_importance_sampling_mode: use one of {IS_MODES}")
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        need(low is None or high is None or low < high,
             f"vllm_importance_sampling_clip_min ({low}) must be less than vllm_importance_sampling_clip_max ({high})")
        need(self.max_dynamic_sampling_draws >= 1, f"max_dynamic_sampling_draws={self.max_dynamic_sampling_draws} must be >= 1")
        need(not self.dynamic_sampling or self.num_generations >= 2,
             f"dynamic_sampling=True needs num_generations >= 2 (got {self.num_generations}): a group of one has no variance "
             "to filter on; set dynamic_sampling=False")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        need(self.max_tool_calling_iterations >= 1,
             f"max_tool_calling_iterations={self.max_tool_calling_iterations} must be >= 1 (without tools it is not used)")
        need(self.tool_call_timeout > 0, f"tool_call_timeout={self.tool_call_timeout} must be > 0 seconds")
        need(self.max_tool_response_length >= 1, f"max_tool_response_length={self.max_tool_response_length} must be >= 1")
        need(self.tenants_per_step is None or self.tenants_per_step >= 1,
             f"tenants_per_step={self.tenants_per_step} must be >= 1 (or None: every tenant every step)")
        need(self.tenants_per_forward is None or self.tenants_per_forward >= 1,
             f"tenants_per_forward={self.tenants_per_forward} must be >= 1 (or None: every picked tenant in one forward)")
        need(self.tenant_sampling in TENANT_SAMPLING, f"tenant_sampling={self.tenant_sampling!r}: use one of {TENANT_SAMPLING}")
        need(self.tenant_offload in TENANT_OFFLOAD, f"tenant_offload={self.tenant_offload!r}: use None, 'cpu' or 'disk'")
        need(self.tenant_offload_dir is None or self.tenant_offload == "disk",
             f"tenant_offload_dir={self.tenant_offload_dir!r} is for tenant_offload='disk' (got {self.tenant_offload!r})")
        from preft_rl.adapters.serialization import SERVED_NAME

        need(self.push_adapter_name is None or bool(SERVED_NAME.fullmatch(self.push_adapter_name)),
             f"push_adapter_name={self.push_adapter_name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
             "letter or digit (the name `preft-rl serve` serves it under)")
        need(self.push_to_server is None or self.push_to_server.startswith(("http://", "https://")),
             f"push_to_server={self.push_to_server!r} must be a server's base URL such as http://127.0.0.1:8000")
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        unknown = set(self.report_to) - {"tensorboard", "wandb"}
        need(not unknown, f"report_to={sorted(unknown)}: use 'none', 'tensorboard' or 'wandb'")
        for tracker in self.report_to:
            need(importlib.util.find_spec(tracker) is not None, f"report_to={tracker!r} but {tracker} is not installed; pip install {tracker}")

    # ------------------------------------------------------------------ what one training step is
    @property
    def steps_per_generation(self) -> int:
        """Training steps that reuse one rollout (GRPO's num_iterations)."""
        return 1

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer steps in one training step (PPO: epochs x mini-batches)."""
        return 1

    def generation_batch_size(self, num_processes: int) -> int:
        """Completions generated per rollout over all processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes

    def resolved_max_steps(self, num_prompts: int, num_processes: int) -> int:
        """max_steps, or (max_steps <= 0) the steps that cover num_train_epochs passes over the prompts."""
        if self.max_steps > 0:
            return self.max_steps
        prompts_per_rollout = self.generation_batch_size(num_processes) // self.num_generations
        return max(1, math.ceil(self.num_train_epochs * num_prompts / prompts_per_rollout)) * self.steps_per_generation

    def check_batch(self, num_processes: int) -> None:
        """Each process generates whole groups (all num_generations completions of its prompts)."""
        tp = self.engine_tensor_parallel_size
        if num_processes % tp:
            raise ValueError(
                f"{type(self).__name__}: engine_tensor_parallel_size={tp} must divide the {num_processes} training "
                f"process(es): the engine's TP groups are consecutive ranks; use one of "
                f"{[k for k in range(1, num_processes + 1) if num_processes % k == 0]}"
            )
        local = self.generation_batch_size(1)
        if local % self.num_generations:
            valid = [n for n in range(self.min_generations, local + 1) if local % n == 0]
            raise ValueError(
                f"{type(self).__name__}: per_device_train_batch_size ({self.per_device_train_batch_size}) x "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) = {local} completions per process "
                f"per step must be divisible by num_generations={self.num_generations}; use num_generations in {valid} "
                "or change the batch sizes"
            )

    def describe(self, num_processes: int, max_steps: int | None = None) -> str:
        total = self.generation_batch_size(num_processes)
        return (
            f"{num_processes} process(es) x {self.per_device_train_batch_size} completions x "
            f"{self.gradient_accumulation_steps} accumulation = {total} completions per step = "
            f"{total // self.num_generations} prompts x {self.num_generations} generations; "
            f"{max_steps if max_steps is not None else self.max_steps} steps"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
