"""Which tokens an adapter touches: adapter masks, ReFT position masks and position ids.

The per-token rule of the whole project (DESIGN invariant 9): the adapter acts on every token the policy did not sample
and never on a token it sampled. In one turn that is "position below the prompt length" (`prompt_mask_from_lengths`);
in a multi-turn trajectory the tokens the engine sampled in earlier turns are marked by their spans and stay plain
(`adapter_mask_from_spans`). Pad tokens are never adapted. ReFT's 'fN+lM' positions are the first N and last M tokens of
each run of consecutive adapted tokens (one run in one turn: the prompt), so an earlier turn's positions never move when
the conversation grows, and its cached KV stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from preft_rl.kernels import AdapterTokenMetadata

Index = tuple[torch.Tensor, torch.Tensor]  # (batch indices, time indices), as from mask.nonzero(as_tuple=True)


def prompt_mask_from_lengths(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | list[int]) -> torch.Tensor:
    """Bool [B, T]: True at the first `prompt_lengths[b]` non-pad tokens of row b.

    Works for left and right padding alike, because it counts real tokens, not columns.

    >>> am = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    >>> prompt_mask_from_lengths(am, [2, 1]).int().tolist()
    [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    """
    am = attention_mask.bool()
    lengths = torch.as_tensor(prompt_lengths, device=am.device).view(-1, 1)
    if lengths.shape[0] != am.shape[0]:
        raise ValueError(f"prompt_lengths has {lengths.shape[0]} entries but the batch has {am.shape[0]} rows")
    real_tokens = am.sum(-1, keepdim=True)
    if (lengths < 0).any() or (lengths > real_tokens).any():
        raise ValueError(
            f"prompt_lengths {lengths.view(-1).tolist()} must lie in [0, non-pad tokens per row "
            f"{real_tokens.view(-1).tolist()}]"
        )
    rank = am.long().cumsum(-1)  # 1-based rank of each real token in its row
    return am & (rank <= lengths)


def adapter_mask_from_spans(length: int, sampled_spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Bool [length]: True at every token the policy did not sample, False inside each `[start, end)` span of sampled
    tokens (a multi-turn trajectory's earlier completions, their end-of-turn tokens included).

    >>> adapter_mask_from_spans(8, [(2, 4), (6, 7)]).int().tolist()
    [1, 1, 0, 0, 1, 1, 0, 1]
    """
    mask = torch.ones(length, dtype=torch.bool)
    for start, end in check_sampled_spans(sampled_spans, length):
        mask[start:end] = False
    return mask


def check_sampled_spans(sampled_spans: Any, length: int) -> list[tuple[int, int]]:
    """The spans as a sorted list of (start, end) int pairs, checked: inside [0, length), non-empty, not overlapping."""
    try:
        spans = [(int(start), int(end)) for start, end in sampled_spans]
    except (TypeError, ValueError):
        raise ValueError(f"sampled_spans={sampled_spans!r}: give a list of [start, end) token index pairs, e.g. "
                         "[(12, 20)] for tokens 12..19 sampled by the policy") from None
    previous_end = 0
    for start, end in spans:
        if not 0 <= start < end <= length or start < previous_end:
            raise ValueError(f"sampled_spans={spans}: each [start, end) must be non-empty, inside the {length} tokens of "
                             "its sequence, in order and not overlapping the previous one")
        previous_end = end
    return spans


def spans_from_mask(sampled: Sequence[bool] | torch.Tensor) -> list[tuple[int, int]]:
    """The [start, end) runs of True in a per-token 'sampled by the policy' mask.

    >>> spans_from_mask([0, 1, 1, 0, 1])
    [(1, 3), (4, 5)]
    """
    flags = [bool(v) for v in (sampled.tolist() if isinstance(sampled, torch.Tensor) else sampled)]
    spans, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    return spans


def position_ids_from_attention_mask(attention_mask: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Long [B, T]: position of each token counted over real tokens only, so padding does not shift rotary
    positions. With a KV cache, `attention_mask` covers past + new tokens and the last `num_tokens` are returned.

    >>> position_ids_from_attention_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])).tolist()
    [[0, 0, 0, 1], [0, 1, 2, 2]]
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions if num_tokens is None else positions[:, -num_tokens:]


def run_offsets(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each True token of a bool [B, T] mask: (tokens of its run of consecutive True tokens before it, tokens of
    that run after it), both long [B, T], 0 at False tokens.

    >>> [t.tolist() for t in run_offsets(torch.tensor([[0, 1, 1, 1, 0, 1, 1]]).bool())]
    [[[0, 0, 1, 2, 0, 0, 1]], [[0, 2, 1, 0, 0, 1, 0]]]
    """
    index = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    previous = torch.nn.functional.pad(mask, (1, 0))[..., :-1]
    run_start = torch.where(mask & ~previous, index, 0).cummax(-1).values  # the latest run start at or before each token
    following = torch.nn.functional.pad(mask, (0, 1))[..., 1:]
    flipped = torch.where(mask & ~following, mask.shape[-1] - 1 - index, 0).flip(-1).cummax(-1).values.flip(-1)
    run_end = mask.shape[-1] - 1 - flipped  # the earliest run end at or after each token
    return torch.where(mask, index - run_start, 0), torch.where(mask, run_end - index, 0)


def reft_position_mask(adapter_mask: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool masks [B, T] of the first `first` and the last `last` tokens of each run of adapted tokens of each row.

    In one turn the run is the prompt: its first N and last M tokens, however the row is padded. In a multi-turn row,
    every run (a system/user/tool stretch between two sampled spans) has its own first N and last M, so the positions
    of a turn never move when later turns are appended.

    >>> pm = torch.tensor([[False, True, True, True, False]])
    >>> [m.int().tolist() for m in reft_position_mask(pm, 1, 2)]
    [[[0, 1, 0, 0, 0]], [[0, 0, 1, 1, 0]]]
    >>> turns = torch.tensor([[1, 1, 1, 0, 0, 1, 1]]).bool()  # two runs: tokens 0-2 and 5-6
    >>> [m.int().tolist() for m in reft_position_mask(turns, 1, 1)]
    [[[1, 0, 0, 0, 0, 1, 0]], [[0, 0, 1, 0, 0, 0, 1]]]
    """
    before, after = run_offsets(adapter_mask)
    return adapter_mask & (before < first), adapter_mask & (after < last)


@dataclass(frozen=True)
class TokenSelection:
    """Where the adapter acts in one forward call, resolved once (one host sync) for all layers.

    `prompt` indexes the prompt tokens (LoRA); `groups` maps each ReFT intervention group to the
    tokens it acts on. Groups with no tokens are left out.
    """

    prompt: Index
    groups: dict[str, Index]
    shape: tuple[int, int] = (0, 0)  # (batch, seq) of the call
    _metadata: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def rows(self, group: str) -> torch.Tensor:
        """(P,) int64 sorted flat (batch * seq) row indices of `group` ('prompt' or a ReFT group), built once per call."""
        key = "rows:" + group
        cached = self._metadata.get(key)
        if cached is None:
            batch_index, time_index = self.prompt if group == "prompt" else self.groups[group]
            cached = self._metadata[key] = batch_index * self.shape[1] + time_index  # row-major nonzero: sorted
        return cached

    def row_metadata(self, group: str) -> AdapterTokenMetadata:
        """Single-adapter kernel metadata for the flattened (batch * seq) rows of `group` ('prompt' or a ReFT
        group), built once per call and shared by every layer (and by gradient checkpointing's recompute)."""
        cached = self._metadata.get(group)
        if cached is None:
            from preft_rl.kernels import AdapterTokenMetadata

            cached = self._metadata[group] = AdapterTokenMetadata.for_rows(self.rows(group), self.shape[0] * self.shape[1])
        return cached

    @staticmethod
    def build(prompt_mask: torch.Tensor, positions: tuple[int, int] | None, groups: tuple[str, ...]) -> TokenSelection | None:
        """None when no token is a prompt token: a pure-decode call does no adapter work at all."""
        if not bool(prompt_mask.any()):
            return None
        if positions is None:
            group_masks = {name: prompt_mask for name in groups}
        else:
            first_mask, last_mask = reft_position_mask(prompt_mask, *positions)
            if groups == ("shared",):
                group_masks = {"shared": first_mask | last_mask}
            else:
                group_masks = {"first": first_mask, "last": last_mask}
        return TokenSelection(
            prompt=prompt_mask.nonzero(as_tuple=True),
            groups={name: m.nonzero(as_tuple=True) for name, m in group_masks.items() if bool(m.any())},
            shape=(prompt_mask.shape[0], prompt_mask.shape[1]),
        )


@dataclass(frozen=True)
class TenantSelection:
    """Where each tenant's adapter acts in one forward of a TenantPreftModel: the tokens (as a TokenSelection over the
    rows that have a tenant) and, for each row, its tenant's slot in `active` (-1: no tenant, the base model).

    Only the tenants in `active` (those with rows in this forward) take part: their weights are stacked in that order,
    so a tenant without rows is not in the autograd graph at all (its gradient stays None).
    """

    tokens: TokenSelection
    row_slots: torch.Tensor  # (B,) long, index into `active`, -1 = no tenant
    active: tuple[str, ...]
    _metadata: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def groups(self) -> dict[str, Index]:
        return self.tokens.groups

    def metadata(self, group: str) -> AdapterTokenMetadata:
        """Multi-adapter kernel metadata over the flattened (batch * seq) rows: the row's tenant slot at the tokens of
        `group` ('prompt' or a ReFT group), -1 elsewhere; built once per call and shared by every layer."""
        cached = self._metadata.get(group)
        if cached is None:
            from preft_rl.kernels import AdapterTokenMetadata

            batch, seq = self.tokens.shape
            rows = self.tokens.rows(group)
            index = torch.full((batch * seq,), -1, dtype=torch.int32, device=rows.device)
            index[rows] = self.row_slots.to(rows.device)[rows // seq].to(torch.int32)
            cached = self._metadata[group] = AdapterTokenMetadata.build(index)
        return cached

    @staticmethod
    def build(prompt_mask: torch.Tensor, row_slots: torch.Tensor, active: tuple[str, ...], positions: tuple[int, int] | None,
              groups: tuple[str, ...]) -> TenantSelection | None:
        """None when no row with a tenant has a prompt token (the whole call runs the base model)."""
        mask = prompt_mask & (row_slots >= 0).to(prompt_mask.device)[:, None]
        tokens = TokenSelection.build(mask, positions, groups)
        return None if tokens is None else TenantSelection(tokens, row_slots, active)
