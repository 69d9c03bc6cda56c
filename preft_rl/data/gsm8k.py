"""GSM8K as a TRL-style prompt dataset: a chat `prompt` column and the gold `answer` ("... #### N").

Sources: `source="hub"` loads `openai/gsm8k` (config "main"); a path loads a local GSM8K jsonl with
"question"/"answer" fields; `source="generated"` makes GSM8K-style problems offline with reasoning-gym's
`gsm_symbolic` generator (seeded); `source="auto"` (default) tries the hub and falls back to generated
problems, with a warning, when the hub cannot be reached or HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# The prompt format training uses, and so the one evaluation must use (load_gsm8k's default). A worked
# example in the instruction matters for small models: on SmolLM2-135M-Instruct (greedy, 160 tokens, first
# 100 test problems) the instruction alone gave 4% completions ending in '#### N' (77% cut off at 160
# tokens); with this example, 44% (49% cut off). The example is made up, not a GSM8K problem.
EXAMPLE_QUESTION = "A baker makes 12 muffins. She sells 5 and bakes 8 more. How many muffins does she have?"
EXAMPLE_ANSWER = "She has 12 - 5 = 7 muffins left.\nAfter baking she has 7 + 8 = 15 muffins.\n#### 15"
SYSTEM_PROMPT = (
    "Solve the math problem in a few short steps. End with a line '#### <number>'.\n\n"
    f"Example:\nQuestion: {EXAMPLE_QUESTION}\nAnswer:\n{EXAMPLE_ANSWER}"
)


def _as_prompt(question: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.strip()}],
        "answer": answer,
        "question": question,
    }


def _from_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{line_no} lacks 'question' or 'answer'; a GSM8K jsonl has both fields")
            rows.append(_as_prompt(row["question"], row["answer"]))
    return rows


def _from_hub(split: str) -> list[dict]:
    from datasets import load_dataset

    data = load_dataset("openai/gsm8k", "main", split=split)
    return [_as_prompt(r["question"], r["answer"]) for r in data]


def _generated(split: str, size: int, seed: int) -> list[dict]:
    import reasoning_gym

    from .generated import split_seed

    # reasoning-gym draws item i with seed + i: split_seed gives each split its own, non-overlapping seed range
    data = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=split_seed(split, seed, size))
    return [_as_prompt(item["question"], f"#### {item['answer']}") for item in data]


def load_gsm8k(
    split: str = "train", source: str | os.PathLike = "auto", num_examples: int | None = None, seed: int = 0, shuffle: bool = False
):
    """A `datasets.Dataset` with columns prompt (chat messages), answer (gold, '#### N') and question.

    >>> ds = load_gsm8k("train", source="generated", num_examples=4)   # doctest: +SKIP
    >>> ds[0]["prompt"][-1]["role"], ds[0]["answer"].startswith("#### ")   # doctest: +SKIP
    ('user', True)
    """
    from datasets import Dataset

    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: GSM8K has 'train' and 'test'")
    source_str = str(source)
    if source_str == "generated":
        rows = _generated(split, num_examples or 1000, seed)
    elif source_str in ("hub", "auto"):
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if offline and source_str == "hub":
            raise RuntimeError("source='hub' but HF_HUB_OFFLINE=1; pass a local jsonl path or source='generated'")
        try:
            if offline:
                raise ConnectionError("HF_HUB_OFFLINE=1")
            rows = _from_hub(split)
        except Exception as exc:  # noqa: BLE001 - any hub failure falls back, loudly
            if source_str == "hub":
                raise
            logger.warning("openai/gsm8k is not reachable (%s); using offline gsm_symbolic problems instead", exc)
            rows = _generated(split, num_examples or 1000, seed)
    else:
        path = Path(source_str)
        if path.is_dir():
            path = path / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"GSM8K source {source_str!r}: no file {path}; pass a jsonl, a folder with {split}.jsonl, 'hub' or 'generated'")
        rows = _from_jsonl(path)
    dataset = Dataset.from_list(rows)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if num_examples is not None:
        dataset = dataset.select(range(min(num_examples, len(dataset))))
    return dataset
