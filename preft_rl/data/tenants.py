"""A provider's tenants kept in a file: one entry per user, read and checked before anything is built.

JSONL (one JSON object per line) or YAML (a list of mappings), with these fields:

    name           the tenant's name: its adapter folder and served adapter name (letters, digits, '_', '-')
    rewards        reward names from preft_rl.rewards.REWARD_FUNCS, e.g. ["style_terse"] or ["gsm8k_accuracy", "format"]
    data           a numeric reasoning-gym task ("chain_sum", ...: generated offline, held-out rows from its test
                   split) or a JSONL file of rows with a 'prompt' (text or chat messages) or a 'question', relative
                   to the tenants file
    traffic        instead of data: a `preft-rl serve --record` folder, relative to the tenants file; the tenant
                   trains on its recorded prompts and its served responses with feedback (Tenant(traffic=...))
    eval_data      optional: a JSONL file of held-out rows (for file data, where without it the last rows are held
                   out, and for traffic, which is not evaluated without it)
    reward_weights optional: one weight per reward
    learning_rate  optional: the tenant's peak learning rate (default: the run's)

    {"name": "alice", "rewards": ["style_terse"], "data": "chain_sum", "learning_rate": 0.002}

`read_tenants_file(path)` returns checked `TenantEntry`s (an error names the file, the entry and the field);
`tenant_datasets(entry, ...)` loads an entry's training and held-out rows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIELDS = ("name", "rewards", "data", "traffic", "eval_data", "reward_weights", "learning_rate")


@dataclass
class TenantEntry:
    """One checked entry of a tenants file (see the module docstring); paths are resolved against the file's folder."""

    name: str
    rewards: list[str]
    data: str | None  # None: no data of its own (traffic, or `preft-rl online`, which reads --record)
    eval_data: str | None = None
    reward_weights: list[float] | None = None
    learning_rate: float | None = None
    traffic: str | None = None  # a `preft-rl serve --record` folder to train on instead of data


def read_tenants_file(path: str | os.PathLike, require_data: bool = True) -> list[TenantEntry]:
    """The tenants in a .jsonl, .yaml or .yml file, checked: required fields, known reward names, weights, learning
    rates, unique valid names, and files that exist. Each entry has `data` or `traffic`, one of them;
    `require_data=False` (`preft-rl online`, where every tenant's data is its traffic in --record): neither."""
    from preft_rl.adapters.tenants import check_tenant_names
    from preft_rl.rewards import REWARD_FUNCS

    from .generated import NUMERIC_TASKS

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tenants file {path} does not exist")
    raw = _read_entries(path)
    if not raw:
        raise ValueError(f"{path} holds no tenants")
    entries = []
    for where, item in raw:
        def bad(message: str) -> ValueError:
            return ValueError(f"{path} {where}: {message}")

        if not isinstance(item, dict):
            raise bad(f"expected a mapping with fields {list(FIELDS)}, got {type(item).__name__}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise bad(f"unknown field(s) {unknown}; the fields are {list(FIELDS)}")
        for field in ("name", "rewards"):
            if field not in item:
                raise bad(f"'{field}' is missing")
        name, rewards, data, traffic = item["name"], item["rewards"], item.get("data"), item.get("traffic")
        if data is not None and traffic is not None:
            raise bad("give data or traffic, not both")
        if require_data and data is None and traffic is None:
            raise bad("'data' is missing (or 'traffic': a `preft-rl serve --record` folder)")
        if not isinstance(name, str):
            raise bad(f"name={name!r} must be a string")
        if isinstance(rewards, str):
            rewards = [rewards]
        if not isinstance(rewards, list) or not rewards or not all(isinstance(r, str) for r in rewards):
            raise bad(f"rewards={rewards!r} must be a non-empty list of reward names")
        missing = [r for r in rewards if r not in REWARD_FUNCS]
        if missing:
            raise bad(f"unknown reward(s) {missing}; available: {sorted(REWARD_FUNCS)}")
        weights = item.get("reward_weights")
        if weights is not None and (not isinstance(weights, list) or len(weights) != len(rewards)
                                    or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights)):
            raise bad(f"reward_weights={weights!r} must be {len(rewards)} finite number(s), one per reward")
        lr = item.get("learning_rate")
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise bad(f"learning_rate={lr!r} must be a number > 0")
        if traffic is not None:
            if not isinstance(traffic, str) or not traffic:
                raise bad(f"traffic={traffic!r} must be the path of a `preft-rl serve --record` folder")
            folder = path.parent / traffic
            if not (folder / "traffic.sqlite").is_file():
                raise bad(f"traffic folder {folder} holds no traffic.sqlite: give the folder `preft-rl serve --record` "
                          "writes (paths are relative to the tenants file)")
            traffic = str(folder)
        elif data is not None or require_data:
            if not isinstance(data, str) or not data:
                raise bad(f"data={data!r} must be a reasoning-gym task name {list(NUMERIC_TASKS)} or a JSONL path")
            if data not in NUMERIC_TASKS:
                data = str(_existing(path.parent / data, bad, "data"))
        eval_data = item.get("eval_data")
        if eval_data is not None:
            if data in NUMERIC_TASKS or (data is None and traffic is None):
                raise bad(f"eval_data is for file data or traffic; a generated task ({data}) holds out its own test split")
            eval_data = str(_existing(path.parent / str(eval_data), bad, "eval_data"))
        entries.append(TenantEntry(name, list(rewards), data, eval_data, None if weights is None else [float(w) for w in weights],
                                   None if lr is None else float(lr), traffic))
    check_tenant_names([e.name for e in entries])
    return entries


def _read_entries(path: Path) -> list[tuple[str, Any]]:
    """[(where, entry)]: 'line N' for JSONL, 'entry N' for YAML."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: not JSON ({exc.msg}): {line[:120]!r}") from exc
        return entries
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        if isinstance(loaded, dict) and "tenants" in loaded:
            loaded = loaded["tenants"]
        if not isinstance(loaded, list):
            raise ValueError(f"{path}: expected a YAML list of tenants (or a 'tenants:' list), got {type(loaded).__name__}")
        return [(f"entry {i + 1}", item) for i, item in enumerate(loaded)]
    raise ValueError(f"tenants file {path} must end in .jsonl, .yaml or .yml")


def _existing(path: Path, bad: Any, field: str) -> Path:
    if not path.is_file():
        raise bad(f"{field} file {path} does not exist (paths are relative to the tenants file)")
    return path


def tenant_datasets(entry: TenantEntry, system_prompt: str | None = None, num_train: int = 1000, num_eval: int = 48,
                    seed: int = 0) -> tuple[Any, Any]:
    """(train, held_out) datasets of an entry. A generated task: `num_train` training problems and the first
    `num_eval` test problems, prompted with `system_prompt` (None: the task's default). A file: its rows as prompts
    ('question' rows become chat prompts with `system_prompt`), held out from eval_data or, without it, the last
    `num_eval` rows. Traffic: train is None (the trainer reads the log: Tenant(traffic=entry.traffic)), and held_out
    is the first `num_eval` rows of eval_data, or None without it."""
    from datasets import Dataset

    from .generated import NUMERIC_TASKS, load_generated_task

    if entry.traffic is not None:
        if entry.eval_data is None:
            return None, None
        held = [_as_prompt_row(row, system_prompt, entry.eval_data, i) for i, row in enumerate(_jsonl(entry.eval_data))]
        return None, Dataset.from_list(held[:num_eval])

    if entry.data in NUMERIC_TASKS:
        held_out = load_generated_task(entry.data, "test", num_examples=num_eval, seed=seed, system_prompt=system_prompt)
        train = load_generated_task(entry.data, "train", num_examples=num_train, seed=seed, exclude=held_out["question"],
                                    system_prompt=system_prompt)
        return train, held_out
    rows = [_as_prompt_row(row, system_prompt, entry.data, i) for i, row in enumerate(_jsonl(entry.data))]
    if entry.eval_data is not None:
        held = [_as_prompt_row(row, system_prompt, entry.eval_data, i) for i, row in enumerate(_jsonl(entry.eval_data))]
    else:
        if len(rows) <= num_eval:
            raise ValueError(f"tenant {entry.name!r}: {entry.data} has {len(rows)} rows, not enough to hold out {num_eval} "
                             "(add rows or give eval_data)")
        rows, held = rows[:-num_eval], rows[-num_eval:]
    return Dataset.from_list(rows), Dataset.from_list(held[:num_eval])


def _jsonl(path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: not JSON ({exc.msg})") from exc
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def _as_prompt_row(row: Any, system_prompt: str | None, path: str, index: int) -> dict:
    if not isinstance(row, dict) or not ("prompt" in row or "question" in row):
        raise ValueError(f"{path} row {index}: expected an object with a 'prompt' or a 'question', got {row!r:.120}")
    if "prompt" in row:
        return row
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": str(row["question"])}]
    return {**row, "prompt": messages}
