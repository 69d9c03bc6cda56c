"""Greedy held-out evaluation through the trainer's engine, split over processes and gathered in dataset order;
several jobs (each with its own adapter, problems and reward functions) share one engine call."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .rollout import score
from .runtime import as_dataset

if TYPE_CHECKING:
    from .core import PreftRLTrainer


@dataclass
class EvalJob:
    """Problems to score: their dataset (a 'prompt' column), the reward functions and their names, the engine adapter
    that answers them (None: the trainer's policy) and the tools it may call (a tools.Toolset; None: one turn)."""

    dataset: Any
    reward_funcs: list[Callable]
    reward_names: list[str]
    adapter: str | None = None
    toolset: Any = None


def evaluation_scores(trainer: PreftRLTrainer, reward_funcs: Sequence[Callable] | None = None, dataset: Any = None) -> dict[str, list]:
    """See PreftRLTrainer.evaluation_scores."""
    dataset = trainer.eval_dataset if dataset is None else dataset
    if dataset is None:
        raise ValueError("evaluation needs a dataset: pass eval_dataset=... when the trainer is built, or dataset=...")
    funcs = list(reward_funcs) if reward_funcs is not None else trainer.reward_funcs
    names = [getattr(f, "__name__", f"reward_{i}") for i, f in enumerate(funcs)] if reward_funcs is not None else trainer.reward_names
    return evaluate_jobs(trainer, [EvalJob(dataset, funcs, names, toolset=trainer._toolset)])[0]


@torch.no_grad()
def evaluate_jobs(trainer: PreftRLTrainer, jobs: Sequence[EvalJob]) -> list[dict[str, list]]:
    """Greedy completions for every job's problems in one engine call (each with its job's adapter), split over
    processes and scored by each job's functions: per job {reward name: [score per problem] (NaN where a function
    gave None), "completion_length": [...], "completion": [text]}, in dataset order, on every process."""
    from preft_rl.engine import SamplingParams

    args, acc = trainer.args, trainer.accelerator
    datasets = []
    for job in jobs:
        dataset = as_dataset(job.dataset, "dataset")
        if "prompt" not in dataset.column_names:
            raise ValueError(f"the evaluation dataset has columns {dataset.column_names}; it needs a 'prompt' column")
        datasets.append(dataset)
    if not trainer._engine_in_sync:
        trainer._sync_engine()
    items = [(j, i) for j, dataset in enumerate(datasets) for i in range(min(len(dataset), args.eval_max_prompts or len(dataset)))]
    per_process = math.ceil(len(items) / acc.num_processes)
    mine = list(range(acc.process_index, len(items), acc.num_processes))
    rows = [datasets[items[k][0]][items[k][1]] for k in mine]
    prompts = [row["prompt"] for row in rows]
    adapters = [jobs[items[k][0]].adapter for k in mine]
    greedy = SamplingParams(max_tokens=args.max_completion_length, temperature=0.0)
    show = acc.is_main_process and not args.disable_tqdm  # a progress bar: evaluation of hundreds of problems takes minutes
    samples = trainer._generate(prompts, [greedy] * len(prompts), use_tqdm=show,  # every process: TP groups gather
                                adapters=adapters if any(a is not None for a in adapters) else None, rows=rows,
                                toolsets=[jobs[items[k][0]].toolset for k in mine])
    # a completion's text; a multi-turn one's every message, each after its role
    texts = [o if isinstance(o, str) else o[-1]["content"] if len(o) == 1 else "\n".join(f"[{m['role']}] {m['content']}" for m in o)
             for o in samples.completions]
    width = max(len(job.reward_funcs) for job in jobs)
    per_func = torch.full((per_process, width), math.nan)  # padded: equal shapes for gather
    for j, job in enumerate(jobs):
        local = [n for n, k in enumerate(mine) if items[k][0] == j]
        if not local:
            continue
        part = [rows[n] for n in local]
        columns = {key: [row[key] for row in part] for key in part[0] if key != "prompt"}
        if (environments := samples.select(local).environments()) is not None:  # rewards may read them (TRL)
            columns["environments"] = environments
        per_func[local, : len(job.reward_funcs)] = score(job.reward_funcs, job.reward_names, [prompts[n] for n in local],
                                                          [samples.completions[n] for n in local],
                                                          [samples.completion_ids[n] for n in local], columns)
    lengths = torch.full((per_process,), math.nan)
    lengths[: len(mine)] = torch.tensor([float(len(c)) for c in samples.completion_ids])
    index = torch.full((per_process,), math.nan)  # rows with a NaN index (padding) are dropped below
    index[: len(mine)] = torch.tensor(mine, dtype=torch.float32)
    per_func, lengths, index = trainer._gather(per_func), trainer._gather(lengths), trainer._gather(index)
    valid = ~index.isnan()
    order = index[valid].argsort()
    per_func, lengths, index = per_func[valid][order], lengths[valid][order], index[valid][order].long()
    gathered_texts = [list(zip(mine, texts))]
    if acc.num_processes > 1:
        import torch.distributed as dist

        gathered_texts = [None] * acc.num_processes
        dist.all_gather_object(gathered_texts, list(zip(mine, texts)))
    all_texts = [text for _, text in sorted(pair for part in gathered_texts for pair in part)]
    results = []
    for j, job in enumerate(jobs):
        rows_j = [n for n, k in enumerate(index.tolist()) if items[k][0] == j]
        scores = {name: per_func[rows_j, c].tolist() for c, name in enumerate(job.reward_names)}
        scores["completion_length"] = lengths[rows_j].tolist()
        scores["completion"] = [all_texts[n] for n in rows_j]
        results.append(scores)
    return results
