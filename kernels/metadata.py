"""Per-step token -> adapter metadata shared by every multi-adapter op.

The engine builds one `AdapterTokenMetadata` per step from `token_adapter_index` (adapter slot of each
token, -1 for tokens no adapter touches: generated tokens, padding, requests without an adapter) and
reuses it in every layer. Tokens are grouped by adapter so a kernel tile holds tokens of one adapter and
reads that adapter's weights once per tile instead of once per token.

Example: token_adapter_index = [2, -1, 0, 2, 0, -1]
    sorted_token_indices  = [2, 4, 0, 3]   rows grouped by adapter, ascending row order inside a group
    active_adapter_ids    = [0, 2]
    adapter_token_counts  = [2, 2]
    adapter_token_offsets = [0, 2, 4]      group g is sorted_token_indices[offsets[g]:offsets[g + 1]]

Building costs one device->host sync (the group sizes); after that nothing in an op syncs. A step where
every token is -1 is `is_empty`: every op returns at once, launching and gathering nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class AdapterTokenMetadata:
    token_adapter_index: torch.Tensor  # (T,) int32, -1 = no adapter for this token
    sorted_token_indices: torch.Tensor  # (T_active,) int32, token rows grouped by adapter
    active_adapter_ids: torch.Tensor  # (A,) int32, adapter slot of each group, ascending
    adapter_token_counts: torch.Tensor  # (A,) int32, tokens per group
    adapter_token_offsets: torch.Tensor  # (A + 1,) int32, exclusive cumsum of the counts
    active_ids_host: tuple[int, ...]  # host copies of the two small tensors above (no sync to read them)
    counts_host: tuple[int, ...]
    _tiles: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _runs: list[tuple[tuple[int, int, int], ...]] = field(default_factory=list, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.token_adapter_index.shape[0]

    @property
    def num_active_tokens(self) -> int:
        return sum(self.counts_host)

    @property
    def is_empty(self) -> bool:
        """True when no token has an adapter (a pure-decode step): ops launch nothing."""
        return not self.counts_host

    @property
    def device(self) -> torch.device:
        return self.sorted_token_indices.device

    @property
    def max_adapter_id(self) -> int:
        return self.active_ids_host[-1] if self.active_ids_host else -1

    @classmethod
    def build(cls, token_adapter_index: torch.Tensor, device: torch.device | str | None = None) -> AdapterTokenMetadata:
        """Group the tokens of one step by adapter. `token_adapter_index` (T,) int, -1 = no adapter.

        Runs where the index lives (a CPU index from the scheduler is grouped on the CPU) and places the
        result on `device` (default: the index's device).
        """
        if token_adapter_index.dim() != 1:
            raise ValueError(f"token_adapter_index must be 1-D (T,), got shape {tuple(token_adapter_index.shape)}")
        device = torch.device(device) if device is not None else token_adapter_index.device
        index = token_adapter_index.to(torch.int32)
        ids, counts = torch.unique(index, sorted=True, return_counts=True)
        ids_host, counts_host = torch.stack([ids.long(), counts.long()]).tolist() if ids.numel() else ([], [])
        if ids_host and ids_host[0] < -1:
            raise ValueError(f"token_adapter_index holds {ids_host[0]}; use -1 for 'no adapter' and slots >= 0")
        num_inactive = 0
        if ids_host and ids_host[0] == -1:
            num_inactive = counts_host[0]
            ids_host, counts_host = ids_host[1:], counts_host[1:]
        if counts_host:
            # Stable, so rows of one adapter keep ascending order (coalesced gathers, deterministic results).
            sorted_rows = torch.sort(index, stable=True).indices[num_inactive:].to(torch.int32)  # (T_active,)
        else:
            sorted_rows = torch.empty(0, dtype=torch.int32, device=index.device)
        offsets = [0]
        for count in counts_host:
            offsets.append(offsets[-1] + count)
        small = torch.tensor(ids_host + counts_host + offsets, dtype=torch.int32).to(device)
        num_groups = len(ids_host)
        return cls(
            token_adapter_index=index.to(device),
            sorted_token_indices=sorted_rows.to(device),
            active_adapter_ids=small[:num_groups],
            adapter_token_counts=small[num_groups : 2 * num_groups],
            adapter_token_offsets=small[2 * num_groups :],
            active_ids_host=tuple(ids_host),
            counts_host=tuple(counts_host),
        )

    @classmethod
    def for_rows(cls, rows: torch.Tensor, num_tokens: int, adapter: int = 0) -> AdapterTokenMetadata:
        """Single-adapter metadata: `rows` is a bool mask (T,) or row indices (P,) of the tokens adapter
        `adapter` acts on (the training case: one adapter, prompt tokens only)."""
        index = torch.full((num_tokens,), -1, dtype=torch.int32, device=rows.device)
        if rows.dtype == torch.bool:
            if rows.shape != (num_tokens,):
                raise ValueError(f"a bool row mask must have shape ({num_tokens},), got {tuple(rows.shape)}")
            index[rows] = adapter
        else:
            index[rows.long()] = adapter
        return cls.build(index)

    def tiles(self, block_m: int) -> torch.Tensor:
        """(3, n_tiles) int32 work list for kernels that take `block_m` tokens per tile: per tile the adapter
        slot, its first position in `sorted_token_indices` and the end of its group. Each tile holds tokens
        of one adapter only; the number of tiles is sum over groups of ceil(count / block_m), so no program
        is launched just to find it has nothing to do. Cached per block_m for the rest of the step."""
        cached = self._tiles.get(block_m)
        if cached is None:
            counts = torch.tensor(self.counts_host, dtype=torch.int64)  # (A,)
            offsets = torch.cumsum(counts, 0) - counts  # (A,) group starts
            tiles_per_group = (counts + block_m - 1) // block_m
            group = torch.repeat_interleave(torch.arange(len(counts)), tiles_per_group)  # (n_tiles,)
            first_tile = torch.cumsum(tiles_per_group, 0) - tiles_per_group
            start = offsets[group] + (torch.arange(group.numel()) - first_tile[group]) * block_m
            adapter = torch.tensor(self.active_ids_host, dtype=torch.int64)[group]
            end = (offsets + counts)[group]
            cached = torch.stack([adapter, start, end]).to(torch.int32).to(self.device)
            self._tiles[block_m] = cached
        return cached

    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """Host list of (start, end, adapter): maximal runs of consecutive rows that share an adapter slot,
        in row order, rows with -1 left out. In a vLLM step each request's prompt tokens are consecutive
        rows, so a step has at most one run per prefilling request. Example: [2, 2, -1, 0, 0, 2] gives
        ((0, 2, 2), (3, 5, 0), (5, 6, 2)). Computed once per step on the host (one copy of the index)."""
        if not self._runs:
            index = self.token_adapter_index.cpu()
            if index.numel() == 0:
                self._runs.append(())
                return self._runs[0]
            starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(index[1:] != index[:-1]).flatten() + 1])
            ends = torch.cat([starts[1:], torch.tensor([index.numel()])])
            slots = index[starts]
            keep = slots >= 0
            rows = torch.stack([starts[keep], ends[keep], slots[keep].long()], dim=1).tolist()
            self._runs.append(tuple((start, end, slot) for start, end, slot in rows))
        return self._runs[0]

