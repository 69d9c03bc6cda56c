"""PreftGRPOTrainer: GRPO on a prefill-only adapter, rolling out with a colocated PreftEngine.

A lean accelerate loop that keeps TRL's conventions (config names, loss, metric keys); see
docs/design/trainer.md for why it does not subclass TRL's GRPOTrainer. Every process holds its own
in-process engine and generates whole groups for its own prompts. After each optimizer step the engine
receives only the adapter tensors (`update_adapter`); base weights are never merged or reloaded, and
the KL reference is the base model with the adapter switched off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from preft_rl.adapters import PreftConfig, get_preft_model
from preft_rl.models import resolve_model
from preft_rl.rewards.math import RewardErrorCounter

from . import checkpoint
from .grpo_config import PreftGRPOConfig
from .grpo_core import entropy_from_logits, group_advantages, importance_weights, policy_loss, selective_log_softmax
from .rollout import RolloutBatch, pack, prompt_ids_for, reward_nan_counts, sampling_seed, score

logger = logging.getLogger(__name__)
POLICY = "policy"


class PreftGRPOTrainer:
    def __init__(
        self,
        model: str | os.PathLike,
        reward_funcs: Callable | str | Sequence[Callable | str],
        args: PreftGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        preft_config: PreftConfig | None = None,
    ) -> None:
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from preft_rl.engine import PreftEngine
        from preft_rl.rewards import get_reward_func

        self.args = args = args or PreftGRPOConfig()
        train_dataset, eval_dataset = _as_dataset(train_dataset, "train_dataset"), _as_dataset(eval_dataset, "eval_dataset")
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("PreftGRPOTrainer needs a non-empty train_dataset with a 'prompt' column")
        if "prompt" not in train_dataset.column_names:
            raise ValueError(f"train_dataset has columns {train_dataset.column_names}; it needs a 'prompt' column")
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, log_with=args.report_to or None,
            project_dir=args.output_dir, kwargs_handlers=_process_group_kwargs(),
        )
        args.check_batch(self.accelerator.num_processes)
        ds_plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if ds_plugin is not None:  # no dataloader goes through accelerate, so fill DeepSpeed's "auto" batch fields here
            ds_config = ds_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
            ds_config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
            ds_config["train_batch_size"] = args.generation_batch_size(self.accelerator.num_processes)
            if ds_config.get("gradient_clipping", "auto") == "auto":
                ds_config["gradient_clipping"] = args.max_grad_norm if args.max_grad_norm > 0 else 0.0
            ds_config.setdefault("zero_allow_untested_optimizer", True)
        if self.accelerator.is_main_process:
            print(f"PreftGRPOTrainer: {args.describe(self.accelerator.num_processes)}", flush=True)
        torch.manual_seed(args.seed)

        funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
        self.reward_funcs = [get_reward_func(f) if isinstance(f, str) else f for f in funcs]
        self.reward_names = [f if isinstance(f, str) else getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(funcs)]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset

        self.model_path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        if args.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = preft_config or PreftConfig(method="lora", r=16, alpha=32)
        if config.seed is None:
            config.seed = args.seed
        self.preft_model = get_preft_model(base, config)
        self.preft_model.train()
        params = [p for _, p in self.preft_model.adapter_named_parameters()]
        optimizer = torch.optim.AdamW(
            params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay
        )
        from transformers import get_scheduler

        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * args.max_steps), num_training_steps=args.max_steps
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.preft_model, optimizer, scheduler)

        limit = getattr(base.config, "max_position_embeddings", None) or 10**9
        max_len = args.engine_max_model_len or min((args.max_prompt_length or 1024) + args.max_completion_length, limit)
        engine_kwargs = dict(
            dtype="bfloat16" if args.bf16 else "float32", max_model_len=max_len, enforce_eager=args.engine_enforce_eager,
            seed=args.seed + self.accelerator.process_index,
        )
        if torch.cuda.is_available():
            engine_kwargs["gpu_memory_utilization"] = args.engine_gpu_memory_utilization
            engine_kwargs["enable_sleep_mode"] = args.engine_sleep
        engine_kwargs.update(args.engine_kwargs)
        self.engine = PreftEngine(
            self.model_path, max_adapters=1, max_rank=config.r, method=config.method, adapter_scope=config.adapter_scope, **engine_kwargs
        )
        with _gathered([p for _, p in self.preft_model.adapter_named_parameters()], self.accelerator):
            self.engine.add_adapter(POLICY, self.preft_model.adapter_state_dict(), config=config)
        self._engine_in_sync = True

        self.step = 0
        self._rollout: RolloutBatch | None = None  # reused for num_iterations optimizer steps
        if self.accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if args.report_to:
            self.accelerator.init_trackers("preft-grpo", config={k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))})

    # ------------------------------------------------------------------------------ data
    def _prompts_for_step(self, step: int) -> list[dict]:
        """This process's prompts for a generation at `step`: a seeded permutation per epoch."""
        args, acc = self.args, self.accelerator
        local = args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations
        n = len(self.train_dataset)
        generation = step // args.num_iterations
        start = (generation * acc.num_processes + acc.process_index) * local
        rows = []
        for pos in range(start, start + local):
            epoch, offset = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            rows.append(self.train_dataset[perm[offset]])
        return rows

    # ------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _generate_and_score(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        from preft_rl.engine import SamplingParams

        args, acc = self.args, self.accelerator
        timings: dict[str, float] = {}
        rows = self._prompts_for_step(step)
        if not self._engine_in_sync:
            start = time.perf_counter()
            self._sync_engine()
            timings["time/sync"] = time.perf_counter() - start

        prompts = [row["prompt"] for row in rows for _ in range(args.num_generations)]
        prompt_ids = [prompt_ids_for(self.engine.tokenizer, p, args.max_prompt_length) for p in prompts]
        local = len(prompts)
        base_index = (step // args.num_iterations * acc.num_processes + acc.process_index) * local
        params = [
            SamplingParams(
                max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0,
                logprobs=0, seed=sampling_seed(args.seed, step, base_index + i),
            )
            for i in range(local)
        ]
        start = time.perf_counter()
        if args.engine_sleep:
            self.engine.wake_up()
        outputs = self.engine.generate(prompt_ids, params, adapters=[POLICY] * local, use_tqdm=False)
        if args.engine_sleep:
            self.engine.sleep()
        timings["time/generate"] = time.perf_counter() - start
        completion_ids = [list(o.outputs[0].token_ids) for o in outputs]
        completion_logps = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, ids)] for o, ids in zip(outputs, completion_ids)]
        texts = [o.outputs[0].text for o in outputs]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        generated_tokens = sum(map(len, completion_ids))
        timings["rollout/tokens_per_s"] = generated_tokens / max(timings["time/generate"], 1e-9)

        start = time.perf_counter()
        columns = {k: [row[k] for row in rows for _ in range(args.num_generations)] for k in rows[0] if k != "prompt"}
        per_func = score(self.reward_funcs, self.reward_names, prompts, completions, completion_ids, columns)
        rewards = (per_func * self.reward_weights).nansum(dim=1)
        advantages = group_advantages(rewards, args.num_generations, args.scale_rewards)
        timings["time/score"] = time.perf_counter() - start

        packed = pack(prompt_ids, completion_ids, completion_logps, self.tokenizer.pad_token_id or 0)
        eos = self.tokenizer.eos_token_id
        batch = RolloutBatch(
            **packed, advantages=advantages, rewards=rewards, rewards_per_func=per_func,
            completion_lengths=torch.tensor([len(c) for c in completion_ids]),
            truncated=torch.tensor([len(c) >= args.max_completion_length and (not c or c[-1] != eos) for c in completion_ids]),
        )
        start = time.perf_counter()
        if args.num_iterations > 1:
            batch.old_logps = self._logps_no_grad(batch)
        if args.beta > 0:
            with self.preft_model.disable_adapter():
                batch.ref_logps = self._logps_no_grad(batch)
        timings["time/logprobs"] = time.perf_counter() - start
        return batch, timings

    def _sync_engine(self) -> None:
        """Push the adapter tensors (only those) to the engine, gathering ZeRO-3 shards first."""
        params = [p for _, p in self.preft_model.adapter_named_parameters()]
        with _gathered(params, self.accelerator):
            self.engine.update_adapter(POLICY, self.preft_model.adapter_state_dict())
        self._engine_in_sync = True

    # ------------------------------------------------------------------------------ forward
    def _completion_logps(self, batch: RolloutBatch, rows: slice, with_entropy: bool = False):
        """(b, T) log-probs of each token given its prefix (0 at the first position) and optionally entropies."""
        ids, am, pm = batch.input_ids[rows], batch.attention_mask[rows], batch.prompt_mask[rows]
        device = self.accelerator.device
        ids, am, pm = ids.to(device), am.to(device), pm.to(device)
        first = int(pm.sum(-1).min()) - 1  # logits from the earliest last-prompt-token on are needed
        keep = ids.shape[1] - first
        logits = self.model(input_ids=ids, attention_mask=am, prompt_mask=pm, logits_to_keep=keep).logits  # (b, keep, V)
        logps = selective_log_softmax(logits[:, :-1], ids[:, first + 1 :], self.args.temperature)  # (b, keep - 1)
        full = torch.zeros(ids.shape, dtype=logps.dtype, device=device)
        full[:, first + 1 :] = logps
        if not with_entropy:
            return full, None
        with torch.no_grad():
            ent = torch.zeros(ids.shape, device=device)
            ent[:, first + 1 :] = entropy_from_logits(logits[:, :-1].detach(), self.args.temperature)
        return full, ent

    @torch.no_grad()
    def _logps_no_grad(self, batch: RolloutBatch) -> torch.Tensor:
        parts = [self._completion_logps(batch, rows)[0].cpu() for rows in batch.micro_batches(self.args.per_device_train_batch_size)]
        return torch.cat(parts)

    # ------------------------------------------------------------------------------ training
    def _optimizer_step(self, batch: RolloutBatch) -> dict[str, float]:
        args, acc = self.args, self.accelerator
        device = acc.device
        mask_all = batch.completion_mask.float()
        num_items = acc.reduce(mask_all.sum().to(device), reduction="sum").item() / acc.num_processes
        stats = {"loss": 0.0, "clip_ratio": 0.0, "kl": 0.0, "entropy": 0.0}
        micro = batch.micro_batches(args.per_device_train_batch_size)  # gradient_accumulation_steps of them
        for rows in micro:
            with acc.accumulate(self.model):  # backward divides by gradient_accumulation_steps; steps at the last
                mask = batch.completion_mask[rows].to(device).float()
                logps, entropy = self._completion_logps(batch, rows, with_entropy=True)
                old = batch.old_logps[rows].to(device) if batch.old_logps is not None else logps.detach()
                is_w = None
                if args.vllm_importance_sampling_correction:
                    is_w = importance_weights(old, batch.engine_logps[rows].to(device), mask,
                                              args.vllm_importance_sampling_mode, args.vllm_importance_sampling_clip_max)
                out = policy_loss(
                    logps, old, batch.advantages[rows].to(device), mask, loss_type=args.loss_type, epsilon=args.epsilon,
                    epsilon_high=args.epsilon_high, beta=args.beta,
                    ref_logps=None if batch.ref_logps is None else batch.ref_logps[rows].to(device),
                    is_weights=is_w, max_completion_length=args.max_completion_length, num_items=num_items,
                )
                # dapo is already normalised by the whole accumulated batch's tokens: undo accelerate's division
                loss = out.loss * len(micro) if args.loss_type == "dapo" else out.loss
                acc.backward(loss)
                finite = True
                if acc.sync_gradients:  # the norm is taken even without clipping (max_norm=inf scales by exactly 1)
                    clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else math.inf
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
                    if grad_norm is not None:
                        stats["grad_norm"] = float(grad_norm)
                        finite = math.isfinite(stats["grad_norm"])
                if finite:
                    self.optimizer.step()
                else:  # never step on NaN/inf gradients: the weights (and the next checkpoint) would be NaN
                    self._skipped_steps = getattr(self, "_skipped_steps", 0) + 1
                    logger.warning("gradient norm is %s at step %d: optimizer step skipped (%d skipped so far)",
                                   stats["grad_norm"], self.step + 1, self._skipped_steps)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            stats["loss"] += loss.item() / len(micro)
            stats["clip_ratio"] += out.clip_ratio.item() / len(micro)
            stats["kl"] += (out.kl.item() if out.kl is not None else 0.0) / len(micro)
            stats["entropy"] += ((entropy * mask).sum() / mask.sum().clamp(min=1)).item() / len(micro)
        self._engine_in_sync = False
        stats["learning_rate"] = self.scheduler.get_last_lr()[0]
        stats["skipped_steps"] = getattr(self, "_skipped_steps", 0)  # optimizer steps skipped for non-finite gradients
        return stats

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, float]:
        args, acc = self.args, self.accelerator
        if resume_from_checkpoint:
            path = checkpoint.latest(args.output_dir) if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            if path is None:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {args.output_dir} holds no checkpoint-N directory")
            self.step, self._rollout = checkpoint.load(self, path)
            self._engine_in_sync = False
        bar = tqdm(total=args.max_steps, initial=self.step, desc="PreFT GRPO", disable=args.disable_tqdm or not acc.is_main_process)
        metrics: dict[str, float] = {}
        while self.step < args.max_steps:
            start = time.perf_counter()
            timings: dict[str, float] = {}
            if self.step % args.num_iterations == 0 or self._rollout is None:
                self._rollout, timings = self._generate_and_score(self.step)
            train_start = time.perf_counter()
            stats = self._optimizer_step(self._rollout)
            timings["time/backward"] = time.perf_counter() - train_start
            self.step += 1
            timings["time/step"] = time.perf_counter() - start
            metrics = {**self._rollout_metrics(self._rollout), **stats, **timings, "step": self.step}
            if self.step % args.logging_steps == 0 or self.step == args.max_steps:
                self._log(metrics)
            if self.eval_dataset is not None and args.eval_steps > 0 and self.step % args.eval_steps == 0 and self.step < args.max_steps:
                metrics.update(self.evaluate())
            if args.save_steps > 0 and self.step % args.save_steps == 0 and self.step < args.max_steps:
                checkpoint.save(self, self.step, self._rollout)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", **{
                name.removesuffix("_reward"): f"{metrics[f'rewards/{name}/mean']:.2f}" for name in self.reward_names
            }, len=f"{metrics['completions/mean_length']:.0f}")
        bar.close()
        if self.eval_dataset is not None:
            metrics.update(self.evaluate())
        checkpoint.save(self, self.step, self._rollout)
        self.save_model(args.output_dir)
        for tracker in acc.trackers:  # not acc.end_training(): it also destroys the process group vLLM uses
            tracker.finish()
        return metrics

    @torch.no_grad()
    def evaluate(self, reward_funcs: Sequence[Callable] | None = None, log: bool = True) -> dict[str, float]:
        """Greedy completions for eval_dataset (split across processes), scored by the training reward
        functions or by `reward_funcs` (e.g. strict and lenient accuracy); metrics are 'eval/...'."""
        scores = self.evaluation_scores(reward_funcs)
        lengths = scores.pop("completion_length")
        scores.pop("completion")
        funcs = list(reward_funcs) if reward_funcs is not None else self.reward_funcs
        weights = torch.ones(len(funcs)) if reward_funcs is not None else self.reward_weights
        per_func = torch.tensor([scores[name] for name in scores], dtype=torch.float32).T.reshape(len(lengths), len(scores))
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
        from preft_rl.engine import SamplingParams

        dataset = self.eval_dataset if dataset is None else _as_dataset(dataset, "dataset")
        if dataset is None:
            raise ValueError("evaluation needs a dataset: pass eval_dataset=... when the trainer is built, or dataset=...")
        if "prompt" not in dataset.column_names:
            raise ValueError(f"the evaluation dataset has columns {dataset.column_names}; it needs a 'prompt' column")
        args, acc = self.args, self.accelerator
        if not self._engine_in_sync:
            self._sync_engine()
        total = min(len(dataset), args.eval_max_prompts or len(dataset))
        per_process = math.ceil(total / acc.num_processes)
        indices = list(range(acc.process_index, total, acc.num_processes))
        rows = [dataset[i] for i in indices]
        prompts = [row["prompt"] for row in rows]
        prompt_ids = [prompt_ids_for(self.engine.tokenizer, p, args.max_prompt_length) for p in prompts]
        greedy = SamplingParams(max_tokens=args.max_completion_length, temperature=0.0)
        show = acc.is_main_process and not args.disable_tqdm  # a progress bar: evaluation of hundreds of problems takes minutes
        outputs = self.engine.generate(prompt_ids, greedy, adapters=[POLICY] * len(rows), use_tqdm=show) if rows else []
        completion_ids = [list(o.outputs[0].token_ids) for o in outputs]
        texts = [o.outputs[0].text for o in outputs]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        columns = {k: [row[k] for row in rows] for k in (rows[0] if rows else {}) if k != "prompt"}
        funcs = list(reward_funcs) if reward_funcs is not None else self.reward_funcs
        names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(funcs)] if reward_funcs is not None else self.reward_names
        per_func = score(funcs, names, prompts, completions, completion_ids, columns) if rows else torch.empty(0, len(funcs))
        lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float32)
        index = torch.tensor(indices, dtype=torch.float32)
        pad = per_process - len(rows)  # equal shapes for gather; rows with a NaN index are dropped below
        per_func = torch.cat([per_func, torch.full((pad, len(funcs)), math.nan)])
        lengths = torch.cat([lengths, torch.full((pad,), math.nan)])
        index = torch.cat([index, torch.full((pad,), math.nan)])
        gather = lambda t: acc.gather(t.to(acc.device)).cpu()  # noqa: E731
        per_func, lengths, index = gather(per_func), gather(lengths), gather(index)
        valid = ~index.isnan()
        order = index[valid].argsort()
        per_func, lengths = per_func[valid][order], lengths[valid][order]
        scores = {name: per_func[:, j].tolist() for j, name in enumerate(names)}
        scores["completion_length"] = lengths.tolist()
        gathered_texts = [None] * acc.num_processes
        if acc.num_processes > 1:
            import torch.distributed as dist

            dist.all_gather_object(gathered_texts, list(zip(indices, texts)))
        else:
            gathered_texts = [list(zip(indices, texts))]
        scores["completion"] = [text for _, text in sorted(pair for part in gathered_texts for pair in part)]
        return scores

    def _rollout_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        acc = self.accelerator
        gather = lambda t: acc.gather(t.to(acc.device)).cpu()  # noqa: E731
        rewards, per_func = gather(batch.rewards), gather(batch.rewards_per_func)
        lengths = gather(batch.completion_lengths.float())
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "completions/mean_length": lengths.mean().item(),
            "completions/clipped_ratio": gather(batch.truncated.float()).mean().item(),
            "frac_reward_zero_std": (rewards.view(-1, self.args.num_generations).std(-1) == 0).float().mean().item(),
        }
        for j, (name, func) in enumerate(zip(self.reward_names, self.reward_funcs)):
            column = per_func[:, j]
            metrics[f"rewards/{name}/mean"] = torch.nanmean(column).item()
            # cumulative counts: a reward's internal errors (scored None) and the NaN it returned (treated as None)
            metrics[f"rewards/{name}/nan_count"] = float(reward_nan_counts[name])
            if isinstance(getattr(func, "errors", None), RewardErrorCounter):
                metrics[f"rewards/{name}/error_count"] = float(func.errors.count)
            metrics[f"rewards/{name}/std"] = column[~column.isnan()].std().item() if (~column.isnan()).sum() > 1 else 0.0
        return metrics

    def _log(self, metrics: dict[str, float]) -> None:
        if self.args.report_to:
            self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process:
            with open(Path(self.args.output_dir) / "log.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """Write the adapter (adapter_config.json + adapter_model.safetensors)."""
        params = [p for _, p in self.preft_model.adapter_named_parameters()]
        with _gathered(params, self.accelerator):
            if self.accelerator.is_main_process:
                self.preft_model.save_pretrained(output_dir or self.args.output_dir)
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        self.engine.close()


def _as_dataset(data: Any, name: str) -> Any:
    """A datasets.Dataset; a list of row dicts (the usual mistake) is converted, anything else is named."""
    if data is None or hasattr(data, "column_names"):
        return data
    if isinstance(data, list) and all(isinstance(row, dict) for row in data):
        from datasets import Dataset

        return Dataset.from_list(data)
    raise TypeError(f"{name} must be a datasets.Dataset (or a list of row dicts such as {{'prompt': ...}}), "
                    f"got {type(data).__name__}; build one with datasets.Dataset.from_list(rows)")


def _process_group_kwargs() -> list:
    """accelerate has no backend for DeepSpeed on CPU: it lets DeepSpeed start gloo but then reports one
    process whatever the world size, and DeepSpeed's batch check fails. Naming gloo fixes the count."""
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if deepspeed and launched and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


class _gathered:
    """Gather ZeRO-3 shards of `params` for the block (a no-op without DeepSpeed ZeRO-3)."""

    def __init__(self, params: list[torch.nn.Parameter], accelerator: Any) -> None:
        self._ctx = None
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            import deepspeed

            self._ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
