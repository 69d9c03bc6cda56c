"""Time TRL's GRPOTrainer (PEFT LoRA, one process, CPU) step by step, as a baseline for our own trainer.

    result = trl_grpo_steps(resolve_model("smollm2-135m-instruct"), load_gsm8k("train", source=...),
                            gsm8k_accuracy_reward, steps=3, prompts_per_step=2, num_generations=4,
                            max_completion_length=64, rank=16, learning_rate=1e-5, beta=0.04, temperature=1.0,
                            seed=0, generation="vllm", output_dir="/tmp/trl-out")

Each step is one optimizer step on `prompts_per_step` prompts x `num_generations` completions, generated once
(steps_per_generation = num_iterations = 1), with rows taken from `dataset` in order. Settings are matched to
ours where TRL lets them be: fp32 everywhere, LoRA alpha = 2 * r on all linear layers, no gradient checkpointing,
and for vLLM fp32 weights (TRL passes no dtype, and vLLM would otherwise downcast an fp32 checkpoint to bf16),
eager mode and vLLM's default prefix caching (on).

vLLM-CPU: TRL's colocated weight sync (`VLLMGeneration.sync_weights`, trl/generation/vllm_generation.py) calls the
vLLM model's `load_weights` with one parameter at a time. vLLM-CPU repacks linear weights after loading (its
parameters are replaced and lose their `weight_loader`), so that call fails with "'Parameter' object has no
attribute 'weight_loader'". For this benchmark, and only on the trainer built here, the sync is replaced by vLLM's
own in-place reload (`collective_rpc("reload_weights", weights_iterator=...)`), fed with the merged (base + LoRA)
weights; the result's notes say so.

TRL, PEFT and transformers are imported inside the function (importing this module is cheap); vLLM is never imported
here: its objects are reached through the trainer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

# VLLM_CPU_KVCACHE_SPACE when unset: vLLM-CPU sizes its KV cache from it, in GiB. 1, as our engines' default
# (preft_rl/engine/common.py, default_vllm_settings); a GRPO step here needs far less (8 x 256 tokens of SmolLM2 is
# about 0.1 GiB), and 4 GiB took the run's peak resident set to 11.3 GiB.
_KV_CACHE_GIB = 1
# Environment variables TRL sets for vLLM's colocated start (trl/generation/vllm_generation.py, _init_vllm); they are
# put back as they were after the run.
_TRL_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_CPU_KVCACHE_SPACE")


def _rss_gib() -> float:
    """Resident set of this process now, in GiB (/proc/self/statm, second field, in pages)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1024**3


def _check_args(dataset: Any, steps: int, prompts_per_step: int, num_generations: int, max_completion_length: int,
                rank: int, generation: str) -> None:
    for name, value in (("steps", steps), ("prompts_per_step", prompts_per_step), ("num_generations", num_generations),
                        ("max_completion_length", max_completion_length), ("rank", rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if num_generations < 2:
        raise ValueError(f"num_generations={num_generations}: GRPO needs at least 2 completions per prompt")
    if generation not in ("vllm", "hf"):
        raise ValueError(f"generation={generation!r}: use 'vllm' (TRL's colocated vLLM) or 'hf' (transformers generate)")
    for column in ("prompt", "answer"):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has columns {dataset.column_names}; it needs a {column!r} column")
    if len(dataset) < steps * prompts_per_step:
        raise ValueError(f"dataset has {len(dataset)} rows; {steps} steps x {prompts_per_step} prompts need "
                         f"{steps * prompts_per_step}")


def _merged_weights(peft_model: Any) -> Iterator[tuple[str, Any]]:
    """(checkpoint name, tensor) for every base-model parameter, LoRA layers merged: W + scaling * B @ A.

    The merged tensors are new ones, so nothing is merged into (or unmerged from) the training model, and vLLM may
    keep references to them until it has a whole layer. Other parameters (embeddings, norms) are frozen and are
    passed as they are. Tied weights appear once (named_parameters), as vLLM's loaders expect.
    """
    import torch

    lora_modules = {}
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            lora_modules[module_name] = module
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                continue
            module_name, _, leaf = name.rpartition(".")
            tensor = param.detach()
            if module_name.endswith(".base_layer") and leaf == "weight":
                owner = lora_modules.get(module_name.removesuffix(".base_layer"))
                if owner is not None and not owner.merged:
                    for adapter in owner.active_adapters:
                        if adapter in owner.lora_A:
                            tensor = tensor + owner.get_delta_weight(adapter).to(tensor.dtype)
            yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), tensor


class _Timers:
    """Per-step sums filled by the wrapped generate / sync / generation entry points."""

    def __init__(self) -> None:
        self.generate_s = 0.0
        self.sync_s = 0.0
        self.completion_tokens = 0
        self.generate_calls = 0

    def reset(self) -> None:
        self.__init__()


def _timed(fn: Callable, timers: _Timers, field: str) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(timers, field, getattr(timers, field) + time.perf_counter() - start)
            if field == "generate_s":
                timers.generate_calls += 1

    wrapper.__wrapped__ = fn
    return wrapper


def _vllm_max_model_len(tokenizer: Any, dataset: Any, max_completion_length: int, model_max: int | None) -> int:
    """The longest templated prompt among the rows the run consumes, plus the completion, rounded up to 256."""
    longest = max(len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
                  for p in dataset["prompt"])
    length = -(-(longest + max_completion_length) // 256) * 256
    return min(length, model_max) if model_max else length


def trl_grpo_steps(model_path: str, dataset, reward_func, *, steps: int, prompts_per_step: int, num_generations: int,
                   max_completion_length: int, rank: int, learning_rate: float, beta: float, temperature: float,
                   seed: int, generation: str, output_dir: str) -> dict:
    """Run `steps` optimizer steps of TRL's GRPOTrainer and time each one.

    Returns {"steps": [{"step", "step_s", "generate_s", "sync_s", "completion_tokens", "rss_gib", "loss"}, ...],
    "notes": [...], "peak_rss_gib": ...}. step_s is the whole optimizer step (generation, weight sync, rewards,
    log-prob passes, backward, optimizer), measured between the trainer's on_step_begin and on_step_end callbacks.
    """
    _check_args(dataset, steps, prompts_per_step, num_generations, max_completion_length, rank, generation)
    use_vllm = generation == "vllm"
    notes: list[str] = []
    saved_env = {key: os.environ.get(key) for key in _TRL_ENV}
    if use_vllm and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(_KV_CACHE_GIB)
        notes.append(f"VLLM_CPU_KVCACHE_SPACE was unset; set to {_KV_CACHE_GIB} (GiB of KV cache for vLLM-CPU) for this run")
    import torch

    # vLLM-CPU's worker replaces torch.set_num_threads process-wide with a no-op (vllm/v1/worker/cpu_worker.py,
    # init_device); it is put back after the run so that later work in this process can set its threads.
    set_num_threads = torch.set_num_threads
    try:
        return _run(model_path, dataset.select(range(steps * prompts_per_step)), reward_func, notes,
                    steps=steps, prompts_per_step=prompts_per_step, num_generations=num_generations,
                    max_completion_length=max_completion_length, rank=rank, learning_rate=learning_rate, beta=beta,
                    temperature=temperature, seed=seed, use_vllm=use_vllm, output_dir=output_dir)
    finally:
        import gc

        gc.collect()  # the trainer and vLLM hold reference cycles; free them now, not at some later collection
        torch.set_num_threads = set_num_threads
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(model_path: str, dataset: Any, reward_func: Callable, notes: list[str], *, steps: int, prompts_per_step: int,
         num_generations: int, max_completion_length: int, rank: int, learning_rate: float, beta: float,
         temperature: float, seed: int, use_vllm: bool, output_dir: str) -> dict:
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from preft_rl.trainers.runtime import peak_rss_gib

    notes.append(f"TRL {trl.__version__}, PEFT {peft.__version__}, transformers {transformers.__version__}, "
                 f"torch {torch.__version__} ({torch.get_num_threads()} threads); generation: "
                 + ("vLLM colocated in the training process" if use_vllm else "transformers generate (use_vllm=False)"))

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left", truncation_side="left")
    batch = prompts_per_step * num_generations
    vllm_max_len = None
    if use_vllm:
        vllm_max_len = _vllm_max_model_len(tokenizer, dataset, max_completion_length,
                                           getattr(model.config, "max_position_embeddings", None))
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # one generation per optimizer step ...
        num_iterations=1,  # ... used once
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        learning_rate=learning_rate,
        beta=beta,
        temperature=temperature,
        seed=seed,
        data_seed=seed,
        shuffle_dataset=False,  # RepeatSampler then yields rows in order, each num_generations times
        gradient_checkpointing=False,  # TRL's default is True
        bf16=False,  # TRL's default is True
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_max_model_length=vllm_max_len,
        vllm_enable_sleep_mode=False,
    )
    peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")

    if use_vllm:
        trainer = _build_with_vllm_settings(GRPOTrainer, notes, model=model, reward_funcs=reward_func, args=args,
                                            train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    else:
        trainer = GRPOTrainer(model=model, reward_funcs=reward_func, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config)
    notes.append(f"loss_type={args.loss_type!r} (TRL's default), lr_scheduler={args.lr_scheduler_type!s}, "
                 f"optimizer={args.optim!s}, per_device_train_batch_size={batch}, generation_batch_size="
                 f"{args.generation_batch_size}, steps_per_generation={args.steps_per_generation}")

    timers = _Timers()
    _instrument(trainer, timers, notes, use_vllm)

    rows: list[dict[str, Any]] = []
    missed_generate: list[bool] = []
    losses: dict[int, float] = {}

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timers.reset()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            rows.append({"step": len(rows) + 1, "step_s": time.perf_counter() - self.start,
                         "generate_s": timers.generate_s, "sync_s": timers.sync_s,
                         "completion_tokens": timers.completion_tokens, "rss_gib": _rss_gib(), "loss": None})
            if timers.generate_calls == 0 and not missed_generate:
                missed_generate.append(True)
                notes.append(f"step {len(rows)}: the wrapped generate was not called (TRL generated another way), "
                             "so generate_s is 0 there")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    trainer.add_callback(StepTimer())
    try:
        trainer.train()
        for row in rows:
            row["loss"] = losses.get(row["step"])
        if len(rows) != steps:
            notes.append(f"expected {steps} steps, the trainer ran {len(rows)}")
        return {"steps": rows, "notes": notes, "peak_rss_gib": peak_rss_gib()}
    finally:
        _release(trainer, use_vllm)


def _build_with_vllm_settings(trainer_cls: type, notes: list[str], **kwargs: Any) -> Any:
    """Build the trainer with vLLM started in fp32 and eager mode, which TRL has no settings for.

    TRL's VLLMGeneration._init_vllm (trl/generation/vllm_generation.py) builds `LLM(...)` from its module global
    `LLM`, without a dtype (vLLM then downcasts an fp32 checkpoint to bf16) and without enforce_eager; that global is
    wrapped only while the trainer is built, and restored right after.
    """
    from trl.generation import vllm_generation

    original = vllm_generation.LLM
    added = {"dtype": "float32", "enforce_eager": True}

    def llm_with_settings(*args: Any, **llm_kwargs: Any) -> Any:
        for key, value in added.items():
            llm_kwargs.setdefault(key, value)
        return original(*args, **llm_kwargs)

    vllm_generation.LLM = llm_with_settings
    try:
        trainer = trainer_cls(**kwargs)
    finally:
        vllm_generation.LLM = original
    llm = trainer.vllm_generation.llm
    model_config = llm.llm_engine.model_config
    cache_config = llm.llm_engine.vllm_config.cache_config
    notes.append(f"vLLM started by TRL with dtype={model_config.dtype} and enforce_eager=True (added to TRL's LLM(...) "
                 f"call, which passes neither), max_model_len={model_config.max_model_len}, prefix caching "
                 f"{'on' if cache_config.enable_prefix_caching else 'off'} (TRL leaves vLLM's default), "
                 f"max_num_seqs={llm.llm_engine.vllm_config.scheduler_config.max_num_seqs}, "
                 f"KV cache {os.environ.get('VLLM_CPU_KVCACHE_SPACE')} GiB (VLLM_CPU_KVCACHE_SPACE)")
    return trainer


def _instrument(trainer: Any, timers: _Timers, notes: list[str], use_vllm: bool) -> None:
    """Wrap, on this trainer's objects only, the calls that generate, count tokens and sync weights."""
    single_turn = trainer._generate_single_turn

    def counted_single_turn(*args: Any, **kwargs: Any) -> Any:
        completion_ids, logprobs = single_turn(*args, **kwargs)
        timers.completion_tokens += sum(len(ids) for ids in completion_ids)
        return completion_ids, logprobs

    trainer._generate_single_turn = counted_single_turn
    notes.append("completion_tokens: the completion token ids TRL's _generate_single_turn returns in the step "
                 "(EOS included, nothing after it)")
    if use_vllm:
        vllm_gen = trainer.vllm_generation
        llm = vllm_gen.llm
        llm.generate = _timed(llm.generate, timers, "generate_s")
        notes.append("generate_s: time in vLLM's LLM.generate; sync_s: time in the weight sync before it")
        vllm_gen.sync_weights = _timed(_reload_sync(trainer), timers, "sync_s")
        notes.append(
            "TRL's colocate weight sync fails on vLLM-CPU as shipped: VLLMGeneration.sync_weights "
            "(trl/generation/vllm_generation.py) passes each parameter to the vLLM model's load_weights, but vLLM-CPU "
            "repacks the linear weights after loading, and the repacked parameters have no weight_loader "
            "(\"'Parameter' object has no attribute 'weight_loader'\"); replaced, on this trainer's VLLMGeneration only, "
            "by vLLM's in-place reload, llm.collective_rpc('reload_weights', weights_iterator=merged weights, "
            "is_checkpoint_format=True), fed with W + scaling * B @ A per LoRA layer (PEFT's get_delta_weight) and "
            "the other base weights as they are, then llm.reset_prefix_cache() as TRL does; it runs where TRL's "
            "would (before each step's generation) and is timed in sync_s and step_s")
    else:
        model = trainer.model  # what unwrap_model_for_generation yields in one process (the PeftModel)
        model.generate = _timed(model.generate, timers, "generate_s")
        notes.append("generate_s: time in the PEFT model's generate (LoRA unmerged, as TRL runs it)")


def _reload_sync(trainer: Any) -> Callable[[], None]:
    vllm_gen = trainer.vllm_generation

    def sync_weights() -> None:
        llm = vllm_gen.llm
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _merged_weights(vllm_gen.model),
                                                     "is_checkpoint_format": True})
        llm.reset_prefix_cache()

    return sync_weights


def _release(trainer: Any, use_vllm: bool) -> None:
    """Shut vLLM down (its process groups are process-wide) so that another run can start in this process."""
    import gc

    if use_vllm:
        llm = getattr(getattr(trainer, "vllm_generation", None), "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the process may be ending anyway
                pass
            import sys

            parallel_state = sys.modules.get("vllm.distributed.parallel_state")  # already loaded by vLLM itself
            if parallel_state is not None:
                parallel_state.destroy_model_parallel()
                parallel_state.destroy_distributed_environment()
    gc.collect()
