"""Greedy held-out evaluation through the trainer's engine, split over processes and gathered in dataset order."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .rollout import score
from .runtime import as_dataset

if TYPE_CHECKING:
    from .core import PreftRLTrainer


@torch.no_grad()
def evaluation_scores(trainer: PreftRLTrainer, reward_funcs: Sequence[Callable] | None = None, dataset: Any = None) -> dict[str, list]:
    """See PreftRLTrainer.evaluation_scores."""
    from preft_rl.engine import SamplingParams

    dataset = trainer.eval_dataset if dataset is None else as_dataset(dataset, "dataset")
    if dataset is None:
        raise ValueError("evaluation needs a dataset: pass eval_dataset=... when the trainer is built, or dataset=...")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"the evaluation dataset has columns {dataset.column_names}; it needs a 'prompt' column")
    args, acc = trainer.args, trainer.accelerator
    if not trainer._engine_in_sync:
        trainer._sync_engine()
    total = min(len(dataset), args.eval_max_prompts or len(dataset))
    per_process = math.ceil(total / acc.num_processes)
    indices = list(range(acc.process_index, total, acc.num_processes))
    rows = [dataset[i] for i in indices]
    prompts = [row["prompt"] for row in rows]
    greedy = SamplingParams(max_tokens=args.max_completion_length, temperature=0.0)
    show = acc.is_main_process and not args.disable_tqdm  # a progress bar: evaluation of hundreds of problems takes minutes
    samples = trainer._generate(prompts, [greedy] * len(prompts), use_tqdm=show)  # every process: TP groups gather
    completion_ids, completions = samples.completion_ids, samples.completions
    texts = [o if isinstance(o, str) else o[-1]["content"] for o in completions]
    columns = {k: [row[k] for row in rows] for k in (rows[0] if rows else {}) if k != "prompt"}
    funcs = list(reward_funcs) if reward_funcs is not None else trainer.reward_funcs
    names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(funcs)] if reward_funcs is not None else trainer.reward_names
    per_func = score(funcs, names, prompts, completions, completion_ids, columns) if rows else torch.empty(0, len(funcs))
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float32)
    index = torch.tensor(indices, dtype=torch.float32)
    pad = per_process - len(rows)  # equal shapes for gather; rows with a NaN index are dropped below
    per_func = torch.cat([per_func, torch.full((pad, len(funcs)), math.nan)])
    lengths = torch.cat([lengths, torch.full((pad,), math.nan)])
    index = torch.cat([index, torch.full((pad,), math.nan)])
    per_func, lengths, index = trainer._gather(per_func), trainer._gather(lengths), trainer._gather(index)
    valid = ~index.isnan()
    order = index[valid].argsort()
    per_func, lengths = per_func[valid][order], lengths[valid][order]
    scores = {name: per_func[:, j].tolist() for j, name in enumerate(names)}
    scores["completion_length"] = lengths.tolist()
    gathered_texts = [list(zip(indices, texts))]
    if acc.num_processes > 1:
        import torch.distributed as dist

        gathered_texts = [None] * acc.num_processes
        dist.all_gather_object(gathered_texts, list(zip(indices, texts)))
    scores["completion"] = [text for _, text in sorted(pair for part in gathered_texts for pair in part)]
    return scores
