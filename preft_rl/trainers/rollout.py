"""One rollout: generate with the engine, score with the reward functions, pack into tensors.

The packed batch carries the engine's own prompt and completion token ids (never re-tokenised text),
right-padded, with the masks the trainer's forward and loss need.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)
# NaN rewards per reward function name in this process: scored like None (no reward), warned about once.
reward_nan_counts: Counter[str] = Counter()


def sampling_seed(seed: int, step: int, index: int) -> int:
    """A per-request sampling seed from (run seed, step, index in the global batch): reproducible runs."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class RolloutBatch:
    """B completions (B = prompts x num_generations, prompt-major) of one process."""

    input_ids: torch.Tensor  # (B, T) prompt + completion ids, right-padded
    attention_mask: torch.Tensor  # (B, T)
    prompt_mask: torch.Tensor  # (B, T) True where the adapter acts: every token the policy did not sample
    completion_mask: torch.Tensor  # (B, T) True at the tokens the policy sampled (EOS included): the loss mask
    engine_logps: torch.Tensor  # (B, T) engine's processed log-prob of each completion token, 0 elsewhere
    advantages: torch.Tensor  # (B,) per sequence (GRPO) or (B, T) per token (PPO)
    rewards: torch.Tensor  # (B,) weighted sum over reward functions
    rewards_per_func: torch.Tensor  # (B, F), NaN where a function gave None
    completion_lengths: torch.Tensor  # (B,)
    truncated: torch.Tensor  # (B,) bool: hit max_completion_length without EOS
    old_logps: torch.Tensor | None = None  # (B, T) trainer log-probs at sampling time (num_iterations > 1)
    ref_logps: torch.Tensor | None = None  # (B, T) base-model log-probs (a KL term)
    values: torch.Tensor | None = None  # (B, T) critic estimates at rollout time (PPO)
    returns: torch.Tensor | None = None  # (B, T) GAE returns, the critic's targets (PPO)
    tenants: list[str] | None = None  # (B,) each row's tenant (a run with tenants; rows of a tenant are consecutive)
    served: list[bool] | None = None  # (B,) a served response from traffic (an off-policy group member), a run with tenants

    def micro_batches(self, size: int) -> list[slice]:
        return [slice(i, i + size) for i in range(0, self.input_ids.shape[0], size)]

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        return dict(self.__dict__)


@dataclass
class Samples:
    """Completions before packing, one entry per completion (prompt-major: a group's completions are consecutive).

    What `_generate` returns and `_score` fills; rollouts of several draws are concatenated, then packed once."""

    prompts: list[Any]  # the prompt of each completion (text or chat messages)
    prompt_ids: list[list[int]]  # the engine's prompt token ids
    completion_ids: list[list[int]]  # the engine's completion token ids
    completion_logps: list[list[float]]  # the engine's processed log-prob of each completion token ([] when not asked)
    completions: list[Any]  # text, or [{"role": "assistant", "content": text}] for a chat prompt
    columns: dict[str, list[Any]] = field(default_factory=dict)  # dataset columns besides 'prompt', one per completion
    rewards_per_func: torch.Tensor | None = None  # (B, F), NaN where a function gave None
    rewards: torch.Tensor | None = None  # (B,) weighted sum, NaN where no function could score
    # multi-turn: per completion token, whether the policy sampled it (False: a tool result or template glue between
    # turns, adapted and outside the loss); None: every completion token was sampled (one turn)
    completion_sampled: list[list[bool]] | None = None
    # multi-turn with tools: each completion's preft_rl.trainers.agent.Trajectory (turns, tool use, environment)
    agent: list[Any] | None = None
    # per completion, the [start, end) spans of its prompt that an earlier turn's policy sampled (a token prompt with
    # 'sampled_spans', e.g. a recorded multi-turn chat): plain, outside the adapter mask; None: no prompt has any
    prompt_spans: list[list[tuple[int, int]]] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, rows: Sequence[int]) -> Samples:
        """The completions at `rows`, in that order."""
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        index = torch.tensor(list(rows), dtype=torch.long)
        return Samples(pick(self.prompts), pick(self.prompt_ids), pick(self.completion_ids), pick(self.completion_logps),
                       pick(self.completions), {k: pick(v) for k, v in self.columns.items()},
                       None if self.rewards_per_func is None else self.rewards_per_func[index],
                       None if self.rewards is None else self.rewards[index],
                       None if self.completion_sampled is None else pick(self.completion_sampled),
                       None if self.agent is None else pick(self.agent),
                       None if self.prompt_spans is None else pick(self.prompt_spans))

    def environments(self) -> list[Any] | None:
        """Each trajectory's environment, for rewards that read it (TRL's `environments=`); None when none has one."""
        if self.agent is None or all(t.environment is None for t in self.agent):
            return None
        return [t.environment for t in self.agent]

    def sampled_masks(self) -> list[list[bool]]:
        """Per completion, per token: sampled by the policy (every token of a one-turn completion)."""
        if self.completion_sampled is not None:
            return self.completion_sampled
        return [[True] * len(ids) for ids in self.completion_ids]

    @staticmethod
    def concat(parts: Sequence[Samples]) -> Samples:
        joined = lambda name: [v for part in parts for v in getattr(part, name)]  # noqa: E731
        scored = all(part.rewards is not None for part in parts)
        multiturn = any(part.completion_sampled is not None for part in parts)
        return Samples(joined("prompts"), joined("prompt_ids"), joined("completion_ids"), joined("completion_logps"),
                       joined("completions"), {k: [v for part in parts for v in part.columns[k]] for k in parts[0].columns},
                       torch.cat([part.rewards_per_func for part in parts]) if scored else None,
                       torch.cat([part.rewards for part in parts]) if scored else None,
                       [m for part in parts for m in part.sampled_masks()] if multiturn else None,
                       joined("agent") if all(part.agent is not None for part in parts) else None,
                       [s for part in parts for s in part.prompt_spans or [[]] * len(part)]
                       if any(part.prompt_spans for part in parts) else None)


def groups_with_signal(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(B,) rewards, prompt-major -> (G,) bool: True where a group's scorable rewards differ (DAPO's dynamic-sampling
    filter). A group whose rewards all agree, or with fewer than two scorable (non-NaN) ones, has zero advantage under
    any group baseline: it carries no learning signal.

    >>> groups_with_signal(torch.tensor([1.0, 1.0, 0.0, 1.0, float("nan"), 1.0]), 2).tolist()
    [False, True, False]
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be (B,) with B divisible by num_generations={num_generations}")
    grouped = rewards.view(-1, num_generations)  # (G, n)
    scorable = ~grouped.isnan()
    high = torch.where(scorable, grouped, -math.inf).max(-1).values  # (G,)
    low = torch.where(scorable, grouped, math.inf).min(-1).values  # (G,)
    return (scorable.sum(-1) >= 2) & (high > low)


def completion_messages(prompts: Sequence[Any], texts: Sequence[str]) -> list[Any]:
    """Each completion as the prompt's format: text for a text prompt, one assistant message for a chat prompt."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def prompt_ids_for(tokenizer: Any, prompt: Any, max_prompt_length: int | None) -> list[int]:
    return prompt_ids_and_spans(tokenizer, prompt, max_prompt_length)[0]


def prompt_ids_and_spans(tokenizer: Any, prompt: Any, max_prompt_length: int | None
                         ) -> tuple[list[int], list[tuple[int, int]]]:
    """A prompt's token ids (its end, at most max_prompt_length) and the [start, end) spans of them an earlier turn's
    policy sampled: a token prompt's 'sampled_spans' (checked), moved with the cut; [] for any other prompt.

    >>> prompt_ids_and_spans(None, {"prompt_token_ids": [5, 6, 7, 8, 9], "sampled_spans": [[1, 3]]}, 3)
    ([7, 8, 9], [(0, 1)])
    """
    from preft_rl.adapters.masks import check_sampled_spans
    from preft_rl.engine.engine import prompt_token_ids

    ids = prompt_token_ids(tokenizer, prompt)
    spans = check_sampled_spans(prompt.get("sampled_spans") or [], len(ids)) if isinstance(prompt, dict) else []
    cut = len(ids) - max_prompt_length if max_prompt_length is not None and len(ids) > max_prompt_length else 0
    if cut:
        ids = ids[cut:]  # keep the end: the question and the generation prompt
        spans = [(max(start - cut, 0), end - cut) for start, end in spans if end > cut]
    return ids, spans


def score(
    reward_funcs: Sequence[Callable],
    reward_names: Sequence[str],
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
) -> torch.Tensor:
    """(B, F) rewards, NaN where a function returned None (or NaN) for a sample. An infinite reward is an
    error: it would make the loss and then the adapter NaN."""
    out = torch.full((len(completions), len(reward_funcs)), math.nan)
    for j, (fn, name) in enumerate(zip(reward_funcs, reward_names)):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(values) != len(completions):
            raise ValueError(f"reward function {name} returned {len(values)} rewards for {len(completions)} completions")
        column = []
        for i, value in enumerate(values):
            value = math.nan if value is None else float(value)
            if math.isinf(value):
                raise ValueError(
                    f"reward function {name!r} returned {value} for row {i} (prompt {_short(prompts[i])}, completion "
                    f"{_short(completions[i])}); rewards must be finite: return None for 'no reward'"
                )
            column.append(value)
        out[:, j] = torch.tensor(column)
        if (num_nan := sum(math.isnan(v) for v, raw in zip(column, values) if raw is not None)):
            if reward_nan_counts[name] == 0:
                logger.warning("reward function %s returned NaN (%d of %d rows); scored as None (no reward), counted in "
                               "preft_rl.trainers.rollout.reward_nan_counts; this warning is shown once", name, num_nan, len(column))
            reward_nan_counts[name] += num_nan
        if out[:, j].isnan().all():
            logger.warning("reward function %s returned None for every completion of this batch", name)
    return out


def reward_error_count(func: Callable) -> int | None:
    """The internal errors a reward function counted so far (`func.errors`: a counter with `.count`, as
    preft_rl.rewards' RewardErrorCounter, or an int); None for a function that counts none."""
    errors = getattr(func, "errors", None)
    count = getattr(errors, "count", errors)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], completion_logps: list[list[float]], pad_id: int,
         completion_sampled: list[list[bool]] | None = None, prompt_spans: list[list[tuple[int, int]]] | None = None) -> dict:
    """Right-padded (B, T) tensors of prompt + completion with their masks and the engine log-probs.

    DESIGN invariant 9: `prompt_mask` (the adapter mask) is True at every token the policy did not sample, and
    `completion_mask` (the loss mask) at every token it sampled. In one turn (`completion_sampled` None) those are the
    prompt and the completion. In a multi-turn trajectory the completion holds every turn after the first prompt, and
    `completion_sampled` marks its sampled tokens; the others (tool results, template glue) are adapted, outside the
    loss, and their `completion_logps` entries are ignored. `prompt_spans`: per row, spans of the prompt that an
    earlier turn's policy sampled (a recorded conversation's assistant messages): plain, outside both masks."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(map(len, rows))
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    prompt_mask = torch.zeros(batch, width, dtype=torch.bool)
    completion_mask = torch.zeros(batch, width, dtype=torch.bool)
    engine_logps = torch.zeros(batch, width)
    for i, (p, c, lp) in enumerate(zip(prompt_ids, completion_ids, completion_logps)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention_mask[i, :n] = 1
        prompt_mask[i, : len(p)] = True
        for start, end in prompt_spans[i] if prompt_spans is not None else ():
            prompt_mask[i, start:end] = False
        sampled = torch.ones(len(c), dtype=torch.bool) if completion_sampled is None else torch.tensor(completion_sampled[i], dtype=torch.bool)
        if sampled.shape[0] != len(c) or (len(c) and not sampled[0]):
            raise ValueError(f"completion {i}: completion_sampled must give one flag per completion token and start with a "
                             f"sampled token; got {sampled.shape[0]} flags for {len(c)} tokens")
        prompt_mask[i, len(p) : n] = ~sampled
        completion_mask[i, len(p) : n] = sampled
        engine_logps[i, len(p) : n] = torch.tensor(lp, dtype=torch.float32) * sampled
    return dict(input_ids=input_ids, attention_mask=attention_mask, prompt_mask=prompt_mask,
                completion_mask=completion_mask, engine_logps=engine_logps)
