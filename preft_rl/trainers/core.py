"""PreftRLTrainer: the RL loop GRPO and PPO share, on a prefill-only adapter with a colocated PreftEngine.

One step, top to bottom (`train`), as named hooks [hook]:

    rollout    _generate_and_score: _prompts_for_step -> _sampling_params -> _generate (engine.generate: prefill with the
               policy adapter, plain decode) -> _score (reward functions) -> _filter_groups (dynamic sampling draws
               again while groups are missing) -> _pack (a RolloutBatch) -> log-prob passes (old policy, adapter-off
               reference) -> _compute_advantages(batch)
    update     _optimizer_step: for each mini-batch (_mini_batches, exactly gradient_accumulation_steps micro-batches)
               and micro-batch, _compute_loss(batch, rows, mini) -> backward (the core undoes accelerate's division:
               a loss is its micro-batch's share of the mini-batch objective) -> clip -> optimizer step (never on NaN)
    sync       _sync_engine before the next rollout: only the policy adapter's tensors go to the engine

Around it: checkpoints (`checkpoint.py`, plus `_checkpoint_state` [hook] for extra trained tensors such as a
critic), metrics and trackers, greedy evaluation, DeepSpeed ZeRO (gathering the policy adapter before a sync or
save). Losses and advantage estimators are registered pure functions (losses.py, advantages.py), selected by config
name: a variant that changes only its maths needs no subclass; one that changes a step overrides that hook. See
docs/design/trainer.md for the hooks in order and why this is not a TRL subclass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from preft_rl.adapters import PreftConfig, get_preft_model
from preft_rl.models import resolve_model

from . import checkpoint
from .grpo_core import entropy_from_logits, nanstd, selective_log_softmax
from .rl_config import PreftRLConfig
from .rollout import (RolloutBatch, Samples, completion_messages, groups_with_signal, pack, prompt_ids_and_spans, prompt_ids_for,
                      reward_error_count, reward_nan_counts, sampling_seed, score)
from .push import check_served_names, check_server, push_adapters
from .runtime import (
    PhaseRecorder,
    as_dataset,
    deepspeed_zero_stage,
    fill_deepspeed_batch_fields,
    gathered,
    process_group_kwargs,
    register_zero3_adapter_parameters,
)

logger = logging.getLogger(__name__)
POLICY = "policy"


class NonFinitePolicyError(RuntimeError):
    """An update made the policy's prompt activations non-finite in the engine (finite weights, too large for the
    model). Raised before any rollout or file uses it; the trainer restored the last policy that served."""


@dataclass
class MiniBatch:
    """One optimizer step's worth of rows, split into gradient-accumulation micro-batches."""

    micro: list[Any]  # row selections (slices or index tensors) into the RolloutBatch
    num_items: float  # completion tokens in this mini-batch over all processes, divided by the process count

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro)


def merge_part_stats(parts: list[tuple[dict[str, float], int]], summed: set[str]) -> dict[str, float]:
    """One micro-batch's statistics from its pieces' (statistics, row count): keys in `summed` (shares of the
    objective) add up; any other key is the row-weighted mean over the pieces that report it."""
    if len(parts) == 1:
        return parts[0][0]
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for stats, _ in parts for k in stats):
        have = [(stats[key], rows) for stats, rows in parts if key in stats]
        out[key] = (sum(v for v, _ in have) if key in summed
                    else sum(v * rows for v, rows in have) / max(sum(rows for _, rows in have), 1))
    return out


class PreftRLTrainer:
    config_class: type[PreftRLConfig] = PreftRLConfig
    display_name = "PreFT RL"
    # statistics of _compute_loss that are shares of a mini-batch sum, as the loss is (the core scales them alike)
    share_stats: tuple[str, ...] = ()

    def __init__(
        self,
        model: str | os.PathLike,
        reward_funcs: Callable | str | Sequence[Callable | str] | None = None,
        args: PreftRLConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        preft_config: PreftConfig | None = None,
        tenants: Any = None,
        tools: Sequence[Callable] | None = None,
        environment_factory: Callable[[], Any] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if tenants is not None:
            raise ValueError(f"{type(self).__name__} does not train tenants; use PreftGRPOTrainer(..., tenants=[...])")
        self._check_tools_supported(tools, environment_factory)
        self.args = args = args or self.config_class()
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__} takes args={self.config_class.__name__}(...), got {type(args).__name__}")
        self._setup_tasks(reward_funcs, train_dataset, eval_dataset)
        if preft_config is not None and not isinstance(preft_config, PreftConfig):
            raise TypeError(f"preft_config must be a PreftConfig, got {type(preft_config).__name__}"
                            + ("; use PreftConfig(**your_dict)" if isinstance(preft_config, dict) else ""))
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=args.report_to or None,
            project_dir=args.output_dir, kwargs_handlers=process_group_kwargs(),
        )
        args.check_batch(self.accelerator.num_processes)
        fill_deepspeed_batch_fields(self.accelerator, args)
        self._check_runtime()
        if args.push_to_server:  # a bad served name, a wrong URL or key fails now, not after the first save
            check_served_names(self._served_adapter_dirs(Path(args.output_dir)))
            check_server(args.push_to_server, args.push_api_key)
        self.max_steps = args.resolved_max_steps(self._num_train_rows(), self.accelerator.num_processes)
        if self.accelerator.is_main_process:
            print(f"{type(self).__name__}: {self._describe_run()}", flush=True)
        torch.manual_seed(args.seed)

        self.model_path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._setup_tools(tools, environment_factory)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        if args.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # a copy: the caller's config keeps its own seed (None stays None there)
        config = dataclasses.replace(preft_config) if preft_config is not None else PreftConfig(method="lora", r=16, alpha=32)
        if config.seed is None:
            config.seed = args.seed
        self.preft_config = config
        self.preft_model = self._build_policy(base, config)
        self.preft_model.train()
        self._build_extra_modules(base)
        optimizer = torch.optim.AdamW(
            self._optimizer_param_groups(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon, weight_decay=args.weight_decay,
        )
        scheduler = self._build_scheduler(optimizer)
        if deepspeed_zero_stage(self.accelerator) == 3:
            register_zero3_adapter_parameters(self._trainable_module())
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self._trainable_module(), optimizer, scheduler)
        self.engine = self._build_engine(base)
        self.step = 0
        self.driver_state: dict[str, Any] = {}  # kept with each checkpoint for a program driving the trainer (_checkpoint_json)
        self._keep_served_policy()  # every method starts as an exact no-op: finite wherever the base is
        self._rollout: RolloutBatch | None = None  # reused for steps_per_generation steps
        self._skipped_steps = 0
        if self.accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if args.report_to:
            self.accelerator.init_trackers(
                type(self).__name__, config={k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))}
            )

    # ------------------------------------------------------------------------------ hooks
    def _setup_tasks(self, reward_funcs: Any, train_dataset: Any, eval_dataset: Any) -> None:
        """Check the training data and reward functions and set train_dataset, eval_dataset, reward_funcs, reward_names
        and reward_weights (a run with tenants sets each tenant's own)."""
        self.train_dataset, self.reward_funcs, self.reward_names, self.reward_weights = resolve_task(
            train_dataset, reward_funcs, self.args.reward_weights, "train_dataset", type(self).__name__)
        from preft_rl.traffic.data import SERVED_COLUMNS

        if set(SERVED_COLUMNS) <= set(self.train_dataset.column_names):
            raise ValueError("train_dataset holds traffic rows (preft_rl.traffic.traffic_dataset), whose served responses "
                             "join their groups in a tenants run only: train with tenants=[Tenant(name, dataset, rewards)]")
        self.eval_dataset = as_dataset(eval_dataset, "eval_dataset")
        if self.eval_dataset is not None and "prompt" in self.eval_dataset.column_names:
            check_prompts(self.eval_dataset, "eval_dataset")

    def _check_tools_supported(self, tools: Any, environment_factory: Any) -> None:
        """Refuse tools in a trainer that cannot train on them (before anything is built)."""

    def _setup_tools(self, tools: Sequence[Callable] | None, environment_factory: Callable[[], Any] | None) -> None:
        """The run's toolset (tools.Toolset: names, a chat dataset, a chat template that keeps earlier tokens, how the
        model sees them); None without tools, and the rollout is the one-turn case of the loop."""
        from .tools import Toolset

        self._toolset = Toolset.build(self.tokenizer, tools, environment_factory, self.train_dataset)

    def _check_runtime(self) -> None:
        """Refuse settings this trainer cannot run with, once the accelerator (processes, DeepSpeed) is known and before
        the model is loaded."""

    def _describe_run(self) -> str:
        """The one line printed at start: processes, completions per step, steps."""
        return self.args.describe(self.accelerator.num_processes, self.max_steps)

    def _num_train_rows(self) -> int:
        """The rows one epoch goes through (what num_train_epochs counts)."""
        return len(self.train_dataset)

    def _build_policy(self, base: torch.nn.Module, config: PreftConfig) -> torch.nn.Module:
        """The trained policy adapter on the frozen base (a PreftModel)."""
        return get_preft_model(base, config)

    def _build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The learning-rate schedule over every optimizer step of the run."""
        from transformers import get_scheduler

        args = self.args
        optimizer_steps = self.max_steps * args.optimizer_steps_per_step
        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * optimizer_steps),
                             num_training_steps=optimizer_steps)

    def _build_extra_modules(self, base: torch.nn.Module) -> None:
        """Build trained modules beside the policy adapter (PPO: a critic adapter and a value head)."""

    def _trainable_module(self) -> torch.nn.Module:
        """The module handed to accelerate / DeepSpeed: it holds every trained parameter."""
        return self.preft_model

    def _optimizer_param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for _, p in self.preft_model.adapter_named_parameters()]}]

    def _needs_old_logps(self) -> bool:
        """Whether the rollout needs the trainer's own log-probs at sampling time (a policy reused off-policy)."""
        return False

    def _needs_ref_logps(self) -> bool:
        """Whether the rollout needs the adapter-off base model's log-probs (a KL term)."""
        return False

    def _compute_advantages(self, batch: RolloutBatch) -> None:
        """Fill batch.advantages (and whatever else the loss needs) from batch.rewards."""
        raise NotImplementedError

    def _mini_batches(self, batch: RolloutBatch) -> list[list[Any]]:
        """The optimizer steps of one training step: each a list of micro-batch row selections."""
        return [batch.micro_batches(self.args.per_device_train_batch_size)]

    def _micro_parts(self, batch: RolloutBatch, rows: Any) -> list[Any]:
        """The pieces one micro-batch's rows go through the model in, each its own forward and backward (gradients
        accumulate; one optimizer step per micro-batch as before). Default: one piece. A subclass splits where the
        pieces' losses are independent (each _compute_loss share is still normalised by the whole mini-batch), to bound
        activation memory. Under DDP the pieces before the last run in no_sync and the last piece's backward reduces the
        sum, so every trained parameter must be in the last piece's graph (a zero-weight term will do); DeepSpeed
        counts backwards as micro-batches, so a subclass must not split under it."""
        return [rows]

    def _compute_loss(self, batch: RolloutBatch, rows: Any, mini: MiniBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """(these rows' share of the mini-batch objective, statistics of these rows). The shares of a mini-batch's
        micro-batches sum to its loss (normalise by the mini-batch, e.g. mini.num_items, or divide a micro-batch mean by
        mini.num_micro_batches); the core handles accelerate's scaling and logs 'loss'. The step's statistics are their
        mean over every micro-batch of every mini-batch (keys in `share_stats` are scaled as the loss is)."""
        raise NotImplementedError

    def _loss_mask(self, batch: RolloutBatch, rows: Any) -> torch.Tensor:
        """(b, T) bool: the tokens the loss averages over."""
        return batch.completion_mask[rows]

    def _checkpoint_state(self) -> dict[str, torch.nn.Parameter]:
        """Trained tensors besides the policy adapter, saved and restored with every checkpoint."""
        return {}

    def _checkpoint_loaded(self) -> None:
        """After a checkpoint replaced the trained tensors: the engine's adapters are stale."""
        self._engine_in_sync = False

    def _checkpoint_json(self) -> dict[str, Any]:
        """Plain trainer state saved in each checkpoint's trainer_state.json beside the step (the rounds of an online
        run; `driver_state`, what a program driving the trainer keeps with each checkpoint, e.g. the online loop's read
        positions); `_checkpoint_json_loaded` gets it back on resume."""
        return {"driver_state": self.driver_state} if getattr(self, "driver_state", None) else {}

    def _checkpoint_json_loaded(self, state: dict[str, Any]) -> None:
        """Restore what `_checkpoint_json` saved (`state`: the whole trainer_state.json)."""
        self.driver_state = dict(state.get("driver_state") or {})

    def _checkpoint_extra_dir(self) -> str | None:
        """A folder of each checkpoint that the three hooks below write, read (checking everything) and apply: trainer
        state that lives outside the model and optimizer (tenant_offload's store). None: there is none."""
        return None

    def _save_checkpoint_extra(self, directory: Path) -> None:
        raise NotImplementedError

    def _read_checkpoint_extra(self, directory: Path) -> Any:
        raise NotImplementedError

    def _apply_checkpoint_extra(self, read: Any) -> None:
        raise NotImplementedError

    def _checkpoint_adapter_files(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """{file inside a checkpoint (as save_model writes it): {file key: the parameter it restores}}."""
        from preft_rl.adapters.serialization import KEY_PREFIX, WEIGHTS_NAME

        return {WEIGHTS_NAME: {KEY_PREFIX + name: p for name, p in self.preft_model.adapter_named_parameters()}}

    # ------------------------------------------------------------------------------ engine
    def _build_engine(self, base: torch.nn.Module) -> Any:
        from preft_rl.engine import PreftEngine

        args, config = self.args, self.preft_config
        limit = getattr(base.config, "max_position_embeddings", None) or 10**9
        max_len = args.engine_max_model_len or min((args.max_prompt_length or 1024) + args.max_completion_length, limit)
        tp = args.engine_tensor_parallel_size
        engine_kwargs = dict(
            dtype="bfloat16" if args.bf16 else "float32", max_model_len=max_len, enforce_eager=args.engine_enforce_eager,
            seed=args.seed + self.accelerator.process_index // tp,  # one seed per TP group: its ranks sample alike
        )
        self._tp_group = None
        if tp > 1:  # colocated TP, as TRL: groups of consecutive ranks, vLLM inside every training process
            self._tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(i * tp, (i + 1) * tp)) for i in range(self.accelerator.num_processes // tp)])
            os.environ.update(RANK=str(self.accelerator.process_index), LOCAL_RANK=str(self.accelerator.local_process_index),
                              WORLD_SIZE=str(self.accelerator.num_processes))
            engine_kwargs.update(tensor_parallel_size=tp, distributed_executor_backend="external_launcher")
        if torch.cuda.is_available():
            engine_kwargs["gpu_memory_utilization"] = args.engine_gpu_memory_utilization
            engine_kwargs["enable_sleep_mode"] = args.engine_sleep
        engine_kwargs.update(args.engine_kwargs)
        states = self._engine_adapter_states()
        engine = PreftEngine(self.model_path, max_adapters=len(states), max_rank=config.r, method=config.method,
                             adapter_scope=config.adapter_scope, **engine_kwargs)
        for name, state in states.items():
            engine.add_adapter(name, state, config=config)
        self._engine_in_sync = True
        return engine

    def _engine_adapter_states(self, changed_only: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """{engine adapter name: file-format tensors} of the policy (ZeRO-3 shards gathered); with `changed_only`, only
        the adapters an update since the last sync changed."""
        with gathered(self._policy_parameters(), self.accelerator):
            return {POLICY: self._copy_if_sharded(self.preft_model.adapter_state_dict())}

    def _copy_if_sharded(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Under ZeRO-3 a gathered parameter's storage is freed when its gather ends: copy what outlives the gather."""
        if deepspeed_zero_stage(self.accelerator) != 3:
            return state
        return {key: tensor.clone() for key, tensor in state.items()}

    def _policy_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.preft_model.adapter_named_parameters()]

    def _sync_engine(self) -> None:
        """Push the policy adapter's tensors (only those) to the engine, gathering ZeRO-3 shards first."""
        for name, state in self._engine_adapter_states(changed_only=True).items():
            self.engine.update_adapter(name, state)
        self._engine_in_sync = True

    def _keep_served_policy(self) -> None:
        """Remember the policy the engine just served without a non-finite activation (a CPU copy of this process's
        adapter parameters, ZeRO-3 shards as they are): what a bad update is rolled back to."""
        self._served_policy = [p.detach().to("cpu", copy=True) for p in self._policy_parameters()]
        self._served_step = self.step

    def _restore_last_served_policy(self) -> None:
        """An update made the policy's activations non-finite in the engine (every request of it failed alone): put
        back the last policy that served, in the model and in the engine, and stop with a clear error. Nothing of the
        bad policy was returned, saved or checkpointed."""
        with torch.no_grad():
            for param, kept in zip(self._policy_parameters(), self._served_policy):
                param.copy_(kept.to(param.device))
        self._sync_engine()
        last = checkpoint.latest(self.args.output_dir)
        raise NonFinitePolicyError(
            f"the policy after step {self.step} makes the engine's prompt activations non-finite (NaN or inf): its "
            "weights are finite but too large for the model (training diverged). No rollout, checkpoint or file used it: "
            f"the policy of step {self._served_step} was put back in the model and the engine. Resume from "
            f"{last or 'the start (no checkpoint yet)'} with a lower learning_rate or max_grad_norm "
            "(trainer.train(resume_from_checkpoint=True))."
        )

    def _check_policy_serves(self) -> None:
        """Before the policy is written anywhere: one prompt through the engine (a prefill and one token), so an update
        that made the policy's activations non-finite is refused instead of saved (NonFinitePolicyError)."""
        from preft_rl.engine import SamplingParams

        if not self._engine_in_sync:
            self._sync_engine()
        prompt = prompt_ids_for(self.engine.tokenizer, self.train_dataset[0]["prompt"], self.args.max_prompt_length)
        self._engine_generate([prompt], [SamplingParams(max_tokens=1, temperature=0)])
        self._keep_served_policy()

    def _engine_generate(self, prompt_ids: list[list[int]], params: list[Any], use_tqdm: bool = False,
                         adapters: list[str] | None = None) -> list[Any]:
        """The engine's outputs for this process's prompts (every process calls it, with or without prompts). Under
        engine TP the ranks of a group must submit the same requests, so they gather the group's prompts (and their
        seeded params), generate them all, and each keeps its own slice. If the policy's activations went non-finite
        in any process, every process puts back the last policy that served and raises NonFinitePolicyError."""
        from preft_rl.engine import FailedRequestsError

        try:
            outputs = self._engine_generate_unchecked(prompt_ids, params, use_tqdm, adapters or [POLICY] * len(prompt_ids))
            failed = 0
        except FailedRequestsError:
            outputs, failed = [], 1
        if self.accelerator.num_processes > 1:  # every process stops together: one may fail on prompts another lacks
            flag = torch.tensor(float(failed), device=self.accelerator.device)
            failed = int(self.accelerator.reduce(flag, reduction="sum").item())
        if failed:
            self._restore_last_served_policy()
        return outputs

    def _engine_generate_unchecked(self, prompt_ids: list[list[int]], params: list[Any], use_tqdm: bool,
                                   adapters: list[str]) -> list[Any]:
        if self._tp_group is None:
            if not prompt_ids:
                return []
            return self.engine.generate(prompt_ids, params, adapters=adapters, use_tqdm=use_tqdm)
        size = torch.distributed.get_world_size(self._tp_group)
        gathered_requests: list[Any] = [None] * size
        torch.distributed.all_gather_object(gathered_requests, list(zip(prompt_ids, params, adapters)), group=self._tp_group)
        everything = [request for part in gathered_requests for request in part]
        if not everything:
            return []
        outputs = self.engine.generate([ids for ids, _, _ in everything], [sp for _, sp, _ in everything],
                                       adapters=[name for _, _, name in everything], use_tqdm=use_tqdm)
        start = sum(len(part) for part in gathered_requests[: torch.distributed.get_rank(self._tp_group)])
        return outputs[start : start + len(prompt_ids)]

    # ------------------------------------------------------------------------------ rollout
    def _prompts_for_step(self, step: int, draw: int = 0, dataset: Any = None) -> list[dict]:
        """This process's prompts of `dataset` (default train_dataset) for the rollout of `step`: a seeded permutation
        per epoch. Draw d > 0 (dynamic sampling asking for more) takes prompts from a permutation seeded by (seed, step,
        d, process), so the main data order is the same with or without dynamic sampling, and a resumed run draws the
        same prompts."""
        args, acc = self.args, self.accelerator
        dataset = self.train_dataset if dataset is None else dataset
        local = args.generation_batch_size(1) // args.num_generations
        n = len(dataset)
        if draw > 0:
            seed = sampling_seed(args.seed, step, (draw * acc.num_processes + acc.process_index) * 7919)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
            return [dataset[perm[i % n]] for i in range(local)]
        generation = step // args.steps_per_generation
        start = (generation * acc.num_processes + acc.process_index) * local
        rows = []
        for pos in range(start, start + local):
            epoch, offset = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            rows.append(dataset[perm[offset]])
        return rows

    def _sampling_params(self, step: int, draw: int, count: int) -> list[Any]:
        """One seeded SamplingParams per completion of this process's draw `draw` of `step`: the seed derives from (seed,
        step, index in the global batch), so generation replays exactly on resume (draw 0 is the plain rollout)."""
        from preft_rl.engine import SamplingParams

        args, acc = self.args, self.accelerator
        if draw == 0:
            base_index = (step // args.steps_per_generation * acc.num_processes + acc.process_index) * count
        else:  # past every draw-0 index of this step: a seed is never reused within a step
            base_index = 2**30 + (draw * acc.num_processes + acc.process_index) * count
        return [
            SamplingParams(max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k or 0, logprobs=0, seed=sampling_seed(args.seed, step, base_index + i))
            for i in range(count)
        ]

    def _generate(self, prompts: list[Any], params: list[Any], use_tqdm: bool = False, adapters: list[str] | None = None,
                  rows: list[dict] | None = None, toolsets: Sequence[Any] | None = None) -> Samples:
        """Completions of `prompts` (one per entry) from the engine with the policy adapter (or the engine adapter named
        per prompt in `adapters`); every process calls it, with or without prompts (engine TP groups gather). Used by
        the rollout and by evaluation. The one rollout loop (agent.run_turns): one turn without tools; with tools, turns
        until the model calls none (`rows`: each prompt's dataset row, for environment.reset(**row); `toolsets`: each
        prompt's tools.Toolset or None, default the run's)."""
        from .agent import AgentSettings, Trajectory, run_turns

        args, tokenizer = self.args, self.engine.tokenizer
        toolsets = [self._toolset] * len(prompts) if toolsets is None else list(toolsets)
        trajectories = []
        for i, (prompt, toolset) in enumerate(zip(prompts, toolsets, strict=True)):
            if toolset is None:
                ids, spans = prompt_ids_and_spans(tokenizer, prompt, args.max_prompt_length)
                trajectories.append(Trajectory(list(ids), prompt_spans=spans))
                continue
            ids = toolset.prompt_ids(tokenizer, prompt)
            trajectory = Trajectory(list(ids[-args.max_prompt_length:] if args.max_prompt_length else ids))
            toolset.start(trajectory, prompt, rows[i] if rows is not None else {"prompt": prompt})
            trajectories.append(trajectory)
        with_tools = any(t.delta is not None for t in trajectories)
        names = adapters or [POLICY] * len(prompts)
        if args.engine_sleep:
            self.engine.wake_up()
        run_turns(trajectories, params,
                  lambda index, requests, ps: self._engine_generate(requests, ps, use_tqdm, [names[i] for i in index]),
                  AgentSettings(args.max_tool_calling_iterations, args.tool_call_timeout, args.max_tool_response_length,
                                args.max_completion_length),
                  tokenizer.eos_token_id, lambda text: tokenizer.encode(text, add_special_tokens=False), tokenizer.decode,
                  keep_going=self._any_process_running)
        if args.engine_sleep:
            self.engine.sleep()
        one_turn = completion_messages(prompts, [t.texts[0] for t in trajectories])
        completions = [t.completion_messages if t.delta is not None else one for t, one in zip(trajectories, one_turn)]
        return Samples(list(prompts), [t.prompt_ids for t in trajectories], [t.tail for t in trajectories],
                       [t.logps for t in trajectories], completions,
                       completion_sampled=[t.sampled for t in trajectories] if with_tools else None,
                       agent=trajectories if with_tools else None,
                       prompt_spans=[t.prompt_spans for t in trajectories] if any(t.prompt_spans for t in trajectories) else None)

    def _any_process_running(self, running: int) -> bool:
        """Whether any process still has trajectories running (every process takes part in every engine round)."""
        if self.accelerator.num_processes == 1:
            return running > 0
        count = torch.tensor(float(running), device=self.accelerator.device)
        return self.accelerator.reduce(count, reduction="sum").item() > 0

    def _score(self, samples: Samples) -> None:
        """Fill samples.rewards_per_func (B, F) and samples.rewards (B,): the weighted sum, NaN where no function could
        score a completion (no reward, never a silent 0.0)."""
        columns = samples.columns
        if (environments := samples.environments()) is not None:  # rewards may read them (TRL)
            columns = {**columns, "environments": environments}
        per_func = score(self.reward_funcs, self.reward_names, samples.prompts, samples.completions, samples.completion_ids,
                         columns)
        rewards = (per_func * self.reward_weights).nansum(dim=1)
        rewards[per_func.isnan().all(dim=1)] = math.nan
        samples.rewards_per_func, samples.rewards = per_func, rewards

    def _filter_groups(self, samples: Samples) -> torch.Tensor:
        """(G,) bool: the groups of this draw the batch may keep; by default all, with dynamic_sampling those whose rewards
        differ. Rejected groups are replaced by new draws while dynamic_sampling allows; a batch still short is filled
        with rejected groups, so it always has its full size."""
        groups = len(samples) // self.args.num_generations
        if not self.args.dynamic_sampling:
            return torch.ones(groups, dtype=torch.bool)
        return groups_with_signal(samples.rewards, self.args.num_generations)

    def _pack(self, samples: Samples) -> RolloutBatch:
        """The training batch of these completions: right-padded token ids with masks, rewards, lengths."""
        eos, limit = self.tokenizer.eos_token_id, self.args.max_completion_length
        return RolloutBatch(
            **pack(samples.prompt_ids, samples.completion_ids, samples.completion_logps, self.tokenizer.pad_token_id or 0,
                   samples.completion_sampled, samples.prompt_spans),
            advantages=torch.zeros(len(samples)), rewards=samples.rewards, rewards_per_func=samples.rewards_per_func,
            completion_lengths=torch.tensor([len(c) for c in samples.completion_ids]),
            truncated=torch.tensor([len(c) >= limit and (not c or c[-1] != eos) for c in samples.completion_ids]),
        )

    def _draw_groups(self, step: int, phases: PhaseRecorder) -> tuple[Samples, dict[str, float]]:
        """This process's completions for `step`: whole groups, as many as one rollout holds. Draws prompts, generates
        (_sampling_params, _generate), scores (_score) and keeps the groups _filter_groups accepts; with dynamic sampling
        it draws again while any process is short, at most max_dynamic_sampling_draws times (every process draws the
        same number of times: engine TP groups generate together). A batch still short is filled with rejected groups."""
        args, acc, n = self.args, self.accelerator, self.args.num_generations
        wanted = args.generation_batch_size(1) // n  # groups per process
        kept: list[Samples] = []
        rejected: list[Samples] = []
        have, draws, tokens = 0, 0, 0
        errors_before = self._reward_error_counts()
        while True:
            rows = self._prompts_for_step(step, draws) if have < wanted else []
            prompts = [row["prompt"] for row in rows for _ in range(n)]
            params = self._sampling_params(step, draws, len(prompts))
            with phases.phase("generate"):
                samples = self._generate(prompts, params, rows=[row for row in rows for _ in range(n)])
            tokens += sum(map(len, samples.completion_ids))
            draws += 1
            if rows:
                samples.columns = {k: [row[k] for row in rows for _ in range(n)] for k in rows[0] if k != "prompt"}
                with phases.phase("score"):
                    self._score(samples)
                keep = self._filter_groups(samples)  # (G,)
                for g, ok in enumerate(keep.tolist()):
                    group = samples.select(range(g * n, (g + 1) * n))
                    if ok and have < wanted:
                        kept.append(group)
                        have += 1
                    elif not ok:
                        rejected.append(group)
            if not args.dynamic_sampling or draws >= args.max_dynamic_sampling_draws:
                break
            if acc.reduce(torch.tensor(float(wanted - have), device=acc.device), reduction="sum").item() == 0:
                break
        refilled = wanted - have
        if refilled:  # the batch keeps its size: rejected groups fill it (zero variance: advantage 0 under a group baseline)
            if args.dynamic_sampling:
                logger.warning("dynamic sampling: %d of %d groups were still missing after %d draws "
                               "(max_dynamic_sampling_draws); groups _filter_groups rejected fill the batch",
                               refilled, wanted, draws)
            kept.extend(rejected[:refilled])
        dropped = acc.reduce(torch.tensor(float(len(rejected) - refilled), device=acc.device), reduction="sum").item()
        refilled = acc.reduce(torch.tensor(float(refilled), device=acc.device), reduction="sum").item()
        stats = {"rollout/draws": float(draws), "rollout/tokens_per_s": tokens / max(phases.seconds.get("generate", 0.0), 1e-9)}
        if args.dynamic_sampling:
            stats.update({"rollout/groups_dropped": dropped, "rollout/groups_refilled": refilled})
        kept_samples = Samples.concat(kept)
        stats.update(self._tool_stats(kept_samples))
        errors_after = self._reward_error_counts()
        for name in errors_after:  # this rollout's internal reward errors, over every process
            count = torch.tensor(float(errors_after[name] - errors_before[name]), device=acc.device)
            stats[f"rewards/{name}/errors"] = acc.reduce(count, reduction="sum").item()
        return kept_samples, stats

    def _tool_stats(self, samples: Samples) -> dict[str, float]:
        """Tool use of a rollout's trajectories, over every process: mean turns, calls, errors, seconds in tools."""
        if samples.agent is None:
            return {}
        acc, agent = self.accelerator, samples.agent
        totals = torch.tensor([float(len(agent)), sum(t.turns for t in agent), sum(t.use.calls for t in agent),
                               sum(t.use.errors for t in agent), sum(t.use.seconds for t in agent)], device=acc.device)
        count, turns, calls, tool_errors, seconds = acc.reduce(totals, reduction="sum").tolist()
        return {"tools/turns": turns / max(count, 1), "tools/calls": calls, "tools/errors": tool_errors, "time/tools": seconds}

    def _reward_error_counts(self) -> dict[str, int]:
        """{name: internal errors so far} of each reward function that counts its own (`fn.errors`)."""
        return {name: count for name, func in zip(self.reward_names, self.reward_funcs)
                if (count := reward_error_count(func)) is not None}

    @torch.no_grad()
    def _generate_and_score(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """The rollout of `step`, hook by hook: _draw_groups (_sampling_params -> _generate -> _score -> _filter_groups,
        again with dynamic sampling) -> _pack -> log-prob passes (old policy, adapter-off reference) ->
        _compute_advantages. Returns the batch and the rollout's timings and counts."""
        phases = PhaseRecorder(self.accelerator.device)
        if not self._engine_in_sync:
            with phases.phase("sync"):
                self._sync_engine()
        samples, stats = self._draw_groups(step, phases)
        self._keep_served_policy()  # this policy served the whole rollout: the one a bad update is rolled back to
        batch = self._pack(samples)
        with phases.phase("logprobs"):
            if self._needs_old_logps():
                batch.old_logps = self._logps_no_grad(batch)
            if self._needs_ref_logps():
                with self.preft_model.disable_adapter():
                    batch.ref_logps = self._logps_no_grad(batch)
        with phases.phase("advantages"):
            self._compute_advantages(batch)
        timings = {f"time/{name}": seconds for name, seconds in phases.seconds.items()}
        timings.update(stats)
        # peak memory: of the engine's generation (sync included), of the no-grad log-prob passes, of the whole rollout
        timings.update({f"memory/{name}_gib": phases.peak_gib[name] for name in ("generate", "logprobs") if name in phases.peak_gib})
        if phases.peak_gib:
            timings["memory/rollout_gib"] = max(phases.peak_gib.values())
        return batch, timings

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate `tensor` over processes (in process order) on the CPU."""
        return self.accelerator.gather(tensor.to(self.accelerator.device)).cpu()

    def _local_rows(self, gathered_rows: torch.Tensor) -> torch.Tensor:
        """This process's part of a tensor gathered over processes with _gather."""
        size = gathered_rows.shape[0] // self.accelerator.num_processes
        return gathered_rows[self.accelerator.process_index * size : (self.accelerator.process_index + 1) * size]

    # ------------------------------------------------------------------------------ forward
    def _forward_inputs(self, batch: RolloutBatch, rows: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(input_ids, attention_mask, prompt_mask) of `rows` on the device, and the first position whose logits
        are needed (the earliest position before a sampled token: the end of the first prompt)."""
        device = self.accelerator.device
        ids, am, pm = batch.input_ids[rows].to(device), batch.attention_mask[rows].to(device), batch.prompt_mask[rows].to(device)
        sampled = batch.completion_mask[rows]  # (b, T) rows are [prompt | completion | padding]
        first_sampled = torch.where(sampled.any(-1), sampled.int().argmax(-1), batch.attention_mask[rows].sum(-1))  # (b,)
        return ids, am, pm, int(first_sampled.min()) - 1

    def _policy_logits(self, ids: torch.Tensor, am: torch.Tensor, pm: torch.Tensor, keep: int, **row_kwargs: Any) -> torch.Tensor:
        """(b, keep, V) policy logits of the last `keep` positions (`row_kwargs`: what _row_kwargs gives these rows)."""
        return self.model(input_ids=ids, attention_mask=am, prompt_mask=pm, logits_to_keep=keep,
                          share_prompts=self.args.share_prompt_forward, **row_kwargs).logits

    def _row_kwargs(self, batch: RolloutBatch, rows: Any) -> dict[str, Any]:
        """Per-row arguments of the policy's forward besides the tokens and masks (a run with tenants: each row's tenant)."""
        return {}

    def _token_logps(self, logits: torch.Tensor, ids: torch.Tensor, first: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, T) log-prob of each token given its prefix (0 before first + 1) from logits of positions first.., and entropies."""
        logps = selective_log_softmax(logits[:, :-1], ids[:, first + 1 :], self.args.temperature)
        full = torch.zeros(ids.shape, dtype=logps.dtype, device=ids.device)
        full[:, first + 1 :] = logps
        if not with_entropy:
            return full, None
        with torch.no_grad():
            entropy = torch.zeros(ids.shape, device=ids.device)
            entropy[:, first + 1 :] = entropy_from_logits(logits[:, :-1].detach(), self.args.temperature)
        return full, entropy

    def _completion_logps(self, batch: RolloutBatch, rows: Any, with_entropy: bool = False):
        """(b, T) policy log-probs of each token given its prefix (0 at the first position) and optionally entropies."""
        ids, am, pm, first = self._forward_inputs(batch, rows)
        logits = self._policy_logits(ids, am, pm, ids.shape[1] - first, **self._row_kwargs(batch, rows))
        return self._token_logps(logits, ids, first, with_entropy)

    @torch.no_grad()
    def _logps_no_grad(self, batch: RolloutBatch) -> torch.Tensor:
        parts = [self._completion_logps(batch, rows)[0].cpu() for rows in batch.micro_batches(self.args.per_device_train_batch_size)]
        return torch.cat(parts)

    def _importance_weights(self, batch: RolloutBatch, rows: Any, old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Weights for the engine-vs-trainer mismatch (None when the correction is off)."""
        from .grpo_core import importance_weights

        args = self.args
        if not args.vllm_importance_sampling_correction:
            return None
        return importance_weights(old, batch.engine_logps[rows].to(mask.device), mask, args.vllm_importance_sampling_mode,
                                  args.vllm_importance_sampling_clip_max, args.vllm_importance_sampling_clip_min)

    # ------------------------------------------------------------------------------ update
    def _optimizer_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One training step: an optimizer step per mini-batch, accumulating over its micro-batches.

        The core owns the loss scaling: `_compute_loss` returns its micro-batch's share of the mini-batch objective (the
        objective is the sum of the shares; see losses.py), and accelerate divides every backward by
        gradient_accumulation_steps, so the core multiplies by it again. A subclass never undoes accelerate's division."""
        args, acc = self.args, self.accelerator
        phases = PhaseRecorder(acc.device)
        totals: dict[str, float] = defaultdict(float)
        count, norms = 0, []
        accumulation = args.gradient_accumulation_steps
        for micro in self._mini_batches(batch):
            if len(micro) != accumulation:  # accelerate steps the optimizer every `accumulation` micro-batches
                raise ValueError(
                    f"{type(self).__name__}._mini_batches returned a mini-batch of {len(micro)} micro-batch(es) but "
                    f"gradient_accumulation_steps={accumulation}: accelerate steps the optimizer once every {accumulation} "
                    f"micro-batches, so every mini-batch must hold exactly {accumulation}")
            tokens = sum(float(self._loss_mask(batch, rows).sum()) for rows in micro)
            num_items = acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum").item() / acc.num_processes
            mini = MiniBatch(micro=micro, num_items=num_items)
            for rows in micro:
                piece_stats = []
                with acc.accumulate(self.model):  # backward divides by gradient_accumulation_steps; steps at the last
                    pieces = self._micro_parts(batch, rows)
                    for i, part in enumerate(pieces):  # DDP reduces the gradients once, in the last piece's backward
                        with acc.no_sync(self.model) if i < len(pieces) - 1 else contextlib.nullcontext():
                            with phases.phase("forward"):
                                loss, stats = self._compute_loss(batch, part, mini)
                            with phases.phase("backward"):
                                acc.backward(loss * accumulation)  # undo accelerate's division: the shares already sum to the loss
                        piece_stats.append(({**stats, "loss": loss.item()}, len(self._loss_mask(batch, part))))
                    with phases.phase("optimizer"):
                        self._apply_gradients(norms)
                # the mini-batch objective is the sum of its shares: a share x the micro-batch count, averaged over them
                stats = merge_part_stats(piece_stats, summed={"loss", *self.share_stats})
                for key in ("loss", *self.share_stats):
                    if key in stats:
                        stats[key] *= accumulation
                for key, value in stats.items():
                    totals[key] += value
                count += 1
        self._engine_in_sync = False
        out = {key: value / max(count, 1) for key, value in totals.items()}
        if norms:
            out["grad_norm"] = sum(norms) / len(norms)
        out["learning_rate"] = self.scheduler.get_last_lr()[0]
        out["skipped_steps"] = self._skipped_steps  # optimizer steps skipped for non-finite gradients
        # seconds summed over micro-batches; peak memory of the training forwards, of the backwards, of the whole update
        out.update({f"time/{name}": seconds for name, seconds in phases.seconds.items()})
        out.update({f"memory/{name}_gib": phases.peak_gib[name] for name in ("forward", "backward") if name in phases.peak_gib})
        if phases.peak_gib:
            out["memory/update_gib"] = max(phases.peak_gib.values())
        return out

    def _apply_gradients(self, norms: list[float]) -> None:
        """Inside acc.accumulate: at the micro-batch that ends a mini-batch, clip and step (never on non-finite
        gradients), appending the gradient norm to `norms`; the scheduler and zero_grad act as accelerate decides."""
        args, acc = self.args, self.accelerator
        finite = True
        if acc.sync_gradients:  # the norm is taken even without clipping (max_norm=inf scales by exactly 1)
            clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
            if grad_norm is not None:
                norms.append(float(grad_norm))
                finite = math.isfinite(norms[-1])
        if finite:
            self.optimizer.step()
        else:  # never step on NaN/inf gradients: the weights (and the next checkpoint) would be NaN
            self._skipped_steps += 1
            logger.warning("gradient norm is %s at step %d: optimizer step skipped (%d skipped so far)",
                           float(grad_norm), self.step + 1, self._skipped_steps)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------ loop
    def load_checkpoint(self, path: str | Path | bool = True) -> int:
        """Restore the latest checkpoint-N of output_dir (True) or the one at `path`: adapters, optimizer, scheduler,
        RNG, step (returned) and the rollout being reused. `train(resume_from_checkpoint=...)` does this first."""
        args = self.args
        found = checkpoint.latest(args.output_dir) if path is True else Path(path)
        if found is None:
            raise FileNotFoundError(f"resume_from_checkpoint=True but {args.output_dir} holds no checkpoint-N directory")
        self.step, self._rollout = checkpoint.load(self, found)
        self._checkpoint_loaded()
        self._keep_served_policy()  # a checkpoint is written only after its policy served (_check_policy_serves)
        return self.step

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, float]:
        args, acc = self.args, self.accelerator
        if resume_from_checkpoint:
            self.load_checkpoint(resume_from_checkpoint)
        bar = tqdm(total=self.max_steps, initial=self.step, desc=self.display_name, disable=args.disable_tqdm or not acc.is_main_process)
        metrics: dict[str, float] = {}
        while self.step < self.max_steps:
            start = time.perf_counter()
            timings: dict[str, float] = {}
            if self.step % args.steps_per_generation == 0 or self._rollout is None:
                self._rollout, timings = self._generate_and_score(self.step)
            train_start = time.perf_counter()
            stats = self._optimizer_step(self._rollout)
            timings["time/update"] = time.perf_counter() - train_start  # forward + backward + optimizer, all micro-batches
            self.step += 1
            timings["time/step"] = time.perf_counter() - start
            metrics = {**self._rollout_metrics(self._rollout), **stats, **timings, "step": self.step}
            if self.step % args.logging_steps == 0 or self.step == self.max_steps:
                self._log(metrics)
            if self.eval_dataset is not None and args.eval_steps > 0 and self.step % args.eval_steps == 0 and self.step < self.max_steps:
                metrics.update(self.evaluate())
            if args.save_steps > 0 and self.step % args.save_steps == 0 and self.step < self.max_steps:
                self._check_policy_serves()  # never checkpoint a policy whose activations overflow
                self._push(checkpoint.save(self, self.step, self._rollout))
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", **{
                name.removesuffix("_reward"): f"{metrics[f'rewards/{name}/mean']:.2f}" for name in self.reward_names
            }, len=f"{metrics['completions/mean_length']:.0f}")
        bar.close()
        if self.eval_dataset is not None:
            metrics.update(self.evaluate())
        self._check_policy_serves()
        checkpoint.save(self, self.step, self._rollout)
        self.save_model(args.output_dir)
        self._push(Path(args.output_dir))
        for tracker in acc.trackers:  # not acc.end_training(): it also destroys the process group vLLM uses
            tracker.finish()
        return metrics

    # ------------------------------------------------------------------------------ metrics
    def _rollout_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        rewards, per_func = self._gather(batch.rewards), self._gather(batch.rewards_per_func)
        lengths = self._gather(batch.completion_lengths.float())
        metrics = {
            "reward": torch.nanmean(rewards).item(),
            "reward_std": nanstd(rewards).item() if (~rewards.isnan()).sum() > 1 else 0.0,
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": self._gather(batch.truncated.float()).mean().item(),
        }
        if self.args.num_generations > 1:
            group_std = nanstd(rewards.view(-1, self.args.num_generations), dim=-1)
            metrics["frac_reward_zero_std"] = torch.nan_to_num(group_std, nan=0.0).eq(0).float().mean().item()
        for j, (name, func) in enumerate(zip(self.reward_names, self.reward_funcs)):
            column = per_func[:, j]
            metrics[f"rewards/{name}/mean"] = torch.nanmean(column).item()
            # cumulative counts: a reward's internal errors (scored None) and the NaN it returned (treated as None)
            metrics[f"rewards/{name}/nan_count"] = float(reward_nan_counts[name])
            if (errors := reward_error_count(func)) is not None:
                metrics[f"rewards/{name}/error_count"] = float(errors)  # this process's, since it started
                metrics[f"rewards/{name}/errors"] = 0.0  # this step's (a rollout's own count replaces it: _draw_groups)
            metrics[f"rewards/{name}/std"] = nanstd(column).item() if (~column.isnan()).sum() > 1 else 0.0
        return metrics

    def _log(self, metrics: dict[str, float]) -> None:
        if self.args.report_to:
            self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process:
            with open(Path(self.args.output_dir) / "log.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")

    # ------------------------------------------------------------------------------ evaluation, saving
    @torch.no_grad()
    def evaluate(self, reward_funcs: Sequence[Callable] | None = None, log: bool = True) -> dict[str, float]:
        """Greedy completions for eval_dataset (split across processes), scored by the training reward
        functions or by `reward_funcs` (e.g. strict and lenient accuracy); metrics are 'eval/...'."""
        scores = self.evaluation_scores(reward_funcs)
        lengths = scores.pop("completion_length")
        scores.pop("completion")
        weights = torch.ones(len(scores)) if reward_funcs is not None else self.reward_weights
        per_func = torch.tensor([scores[name] for name in scores], dtype=torch.float32).T  # (problems, functions)
        metrics = {"eval/reward": (per_func * weights).nansum(1).mean().item(),
                   "eval/completions/mean_length": torch.tensor(lengths).mean().item(), "eval/num_prompts": float(len(lengths))}
        for j, name in enumerate(scores):
            metrics[f"eval/rewards/{name}/mean"] = torch.nanmean(per_func[:, j]).item()
        if log:
            self._log({**metrics, "step": self.step})
        return metrics

    @torch.no_grad()
    def evaluation_scores(self, reward_funcs: Sequence[Callable] | None = None, dataset: Any = None) -> dict[str, list]:
        """Per-problem scores of greedy completions for `dataset` (default: eval_dataset), in dataset order, over
        all processes: {reward name: [score per problem] (NaN where a function gave None), "completion_length": [...],
        "completion": [text]}. The scores of the same problems before and after training are what a paired
        comparison needs; the texts show what the scores measured."""
        from .evaluation import evaluation_scores

        return evaluation_scores(self, reward_funcs, dataset)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """Write the policy adapter (adapter_config.json + adapter_model.safetensors)."""
        with gathered(self._policy_parameters(), self.accelerator):
            if self.accelerator.is_main_process:
                self.preft_model.save_pretrained(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()

    def _served_adapter_dirs(self, root: Path) -> dict[str, Path]:
        """{served name: adapter folder} of what a save under `root` wrote and the server should get."""
        return {self.args.push_adapter_name or Path(self.args.output_dir).resolve().name: root}

    def _pushed(self, versions: dict[str, int | None]) -> None:
        """Called with each push's outcome ({name: served version, None where it failed})."""

    def _push(self, root: Path) -> None:
        """After a save: load the saved adapter(s) into the running server (push_to_server), main process only."""
        args, acc = self.args, self.accelerator
        if args.push_to_server and acc.is_main_process:
            versions = push_adapters(args.push_to_server, self._served_adapter_dirs(root), args.push_api_key)
            self._pushed(versions)
            done = {name: v for name, v in versions.items() if v is not None}
            if done and not args.disable_tqdm:  # beside the progress bar: users see when their server got a new version
                tqdm.write(f"step {self.step}: pushed {', '.join(f'{n} (v{v})' for n, v in done.items())} to {args.push_to_server}")

    def close(self) -> None:
        self.engine.close()


def check_prompts(dataset: Any, name: str) -> None:
    """Every prompt is text, a list of chat messages (dicts with string 'role' and 'content') or token ids as
    {"prompt_token_ids": [...]} with optional "sampled_spans" (traffic rows: the ids a server saw, and the spans of its
    earlier assistant turns); the first bad row is named, before anything is built."""
    from preft_rl.adapters.masks import check_sampled_spans

    for i, prompt in enumerate(dataset["prompt"]):
        if isinstance(prompt, str) and prompt:
            continue
        if isinstance(prompt, dict) and set(prompt) <= {"prompt_token_ids", "sampled_spans"} and isinstance(
                ids := prompt.get("prompt_token_ids"), list) and ids and all(isinstance(t, int) and t >= 0 for t in ids):
            try:
                check_sampled_spans(prompt.get("sampled_spans") or [], len(ids))
            except ValueError as exc:
                raise ValueError(f"{name} row {i}: {exc}") from None
            continue
        if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        ):
            continue
        raise ValueError(f"{name} row {i}: prompt {prompt!r:.120} must be non-empty text, a list of chat messages "
                         "({'role': ..., 'content': ...} with string values) or {'prompt_token_ids': [ids]}")


def resolve_task(train_dataset: Any, reward_funcs: Any, reward_weights: Sequence[float] | None, name: str,
                 owner: str) -> tuple[Any, list[Callable], list[str], torch.Tensor]:
    """(dataset, reward functions, their names, their weights) after checking all of them; `name` is how errors name
    the dataset ('train_dataset', "tenant 'alice' train_dataset"), `owner` what needs it."""
    from preft_rl.rewards import get_reward_func

    dataset = as_dataset(train_dataset, name)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{owner} needs a non-empty {name} with a 'prompt' column")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} has columns {dataset.column_names}; it needs a 'prompt' column")
    check_prompts(dataset, name)
    check_reward_funcs(reward_funcs)
    funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
    resolved = [get_reward_func(f) if isinstance(f, str) else f for f in funcs]
    names = [f if isinstance(f, str) else getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(funcs)]
    weights = list(reward_weights) if reward_weights else [1.0] * len(resolved)
    if len(weights) != len(resolved):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(resolved)} reward functions")
    return dataset, resolved, names, torch.tensor(weights, dtype=torch.float32)


def check_reward_funcs(reward_funcs: Any) -> None:
    from preft_rl.rewards import REWARD_FUNCS

    funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else reward_funcs
    if not isinstance(funcs, (list, tuple)) or not funcs:
        raise TypeError(f"reward_funcs must be a reward function, a registered name or a non-empty list of them, got "
                        f"{reward_funcs!r:.80}")
    for i, func in enumerate(funcs):
        if not callable(func) and not isinstance(func, str):
            raise TypeError(f"reward_funcs[{i}] is {func!r:.80} ({type(func).__name__}); pass a function "
                            f"f(prompts, completions, **columns) -> list[float | None] or one of {sorted(REWARD_FUNCS)}")
