"""Verifiable tasks generated offline with reasoning-gym, in the GSM8K column layout.

`load_generated_task("chain_sum", "train")` gives a `datasets.Dataset` with a chat `prompt`, the gold `answer`
as '#### N' and the `question`, so the GSM8K rewards (strict '#### N' accuracy, format) score it unchanged.
Only tasks whose answers are numbers are accepted. Train and test use disjoint seeds.
"""

from __future__ import annotations

import re

NUMERIC_TASKS = ("chain_sum", "basic_arithmetic", "gsm_symbolic", "leg_counting", "products", "decimal_chain_sum")
# reasoning-gym settings per task. chain_sum's defaults (up to 6 terms of up to 4 digits) are out of reach of the
# offline default model (greedy: 1% strict, 6% lenient on 100 problems); 2-3 terms of 1-2 digits give it room to learn.
TASK_SETTINGS = {"chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)}
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
TASK_SYSTEM_PROMPT = "Work it out briefly. End with a line '#### <number>'.\n\nExample:\nQuestion: What is 12 - 5 + 8?\nAnswer:\n12 - 5 = 7, 7 + 8 = 15.\n#### 15"


SEED_STRIDE = 10**7  # reasoning-gym seeds item i with seed + i: ranges of seeds this far apart never overlap


def split_seed(split: str, seed: int, num_examples: int) -> int:
    """The reasoning-gym seed of a split. Item i of a dataset is drawn with seed + i, so datasets seeded 0 and 1
    share all but one problem; each (split, seed) gets its own range of SEED_STRIDE seeds instead."""
    if num_examples > SEED_STRIDE:
        raise ValueError(f"num_examples={num_examples} is more than {SEED_STRIDE} generated problems per split")
    return (2 * seed + (split == "test") + 1) * SEED_STRIDE


def load_generated_task(name: str, split: str = "train", num_examples: int = 1000, seed: int = 0, exclude=(),
                        system_prompt: str | None = None, settings: dict | None = None):
    """A reasoning-gym task as a prompt dataset (seeded; 'train' and 'test' never share a seed).

    Small problem spaces repeat across seeds (chain_sum draws '3 - 7 + 0 + 3' again), so pass the held-out
    questions as `exclude` when loading training problems; those rows are dropped. `system_prompt` replaces the
    task's default (TASK_SYSTEM_PROMPT: work briefly, end with '#### N'); `settings` replace the task's reasoning-gym
    settings (TASK_SETTINGS), e.g. dict(min_terms=3, max_terms=4, min_digits=2, max_digits=3) for chain_sum."""
    import reasoning_gym
    from datasets import Dataset

    if name not in NUMERIC_TASKS:
        raise ValueError(f"task {name!r} is not one of the numeric reasoning-gym tasks {list(NUMERIC_TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples} must be >= 1")
    data = reasoning_gym.create_dataset(name, size=num_examples, seed=split_seed(split, seed, num_examples),
                                       **(TASK_SETTINGS.get(name, {}) if settings is None else settings))
    rows = []
    excluded = set(exclude)
    for item in data:
        if item["question"] in excluded:
            continue
        answer = str(item["answer"]).strip()
        if not _NUMBER.match(answer):
            raise ValueError(f"reasoning-gym task {name!r} gave a non-numeric answer {answer!r}; pick a numeric task")
        prompt = [{"role": "system", "content": system_prompt or TASK_SYSTEM_PROMPT}, {"role": "user", "content": item["question"].strip()}]
        rows.append({"prompt": prompt, "answer": f"#### {answer}", "question": item["question"]})
    return Dataset.from_list(rows)
