"""Each prompt computed once in the training forward, however many of its completions are in the micro-batch.

With a prefill-only adapter the adapted prompt's keys and values are the same for every completion of a GRPO group,
so computing the prompt once per group is exact. The micro-batch rows `[prompt | completion | padding]` are packed into
one row per distinct prompt, `[prompt | completion 1 | completion 2 | ... | padding]`, with a 4D attention mask: prompt
tokens attend causally to the prompt; a completion's tokens attend to the prompt and causally to their own completion,
never to a sibling; each completion's position ids continue from its prompt's length. One forward of the packed rows
(no KV cache, so gradient checkpointing and DDP see an ordinary forward) gives the hidden states of every position the
loss needs; gradients flow to the adapter through the shared prompt keys and values. The LM head runs only at those
positions, and the logits are scattered back to the unpacked layout the loss expects.

Predicted saving: the linear layers (most of the compute) see G x P + B x C tokens instead of B x (P + C); on GSM8K
(P ~ 300 prompt tokens, C ~ 130 completion tokens, groups of 4) that is about 2.1x fewer, so the training forward and
backward should take a bit over half the time (attention over the packed rows costs about what it did).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedPrompts:
    """The packed rows and where each original row's needed positions are in them."""

    input_ids: torch.Tensor  # (R, L) one row per distinct prompt
    attention_mask: torch.Tensor  # (R, 1, L, L) additive float mask (0 attend, dtype min elsewhere)
    position_ids: torch.Tensor  # (R, L)
    prompt_mask: torch.Tensor  # (R, L) True at prompt tokens
    rows: torch.Tensor  # (N,) packed row of each needed position
    columns: torch.Tensor  # (N,) packed column of each needed position
    targets: tuple[torch.Tensor, torch.Tensor]  # (batch index, kept position index) of each needed position, in the output
    source_rows: list[int]  # (R,) the first original row packed into each packed row

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


def pack_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor, first: int,
                 dtype: torch.dtype, row_keys: list | None = None) -> PackedPrompts | None:
    """Pack right-padded rows `[prompt | completion | pad]` by distinct prompt; None when no prompt repeats (nothing to
    share). `first` is the first position whose logits the caller keeps (the earliest last prompt token). Rows share a
    prompt only if their `row_keys` entries (e.g. each row's tenant, whose adapter the prompt goes through) are equal.

    The prompt of a row is its first run of adapted tokens. A multi-turn row's completion (every later turn) may hold
    adapted tokens too (tool results, template glue): they keep their `prompt_mask` in the packed row, so runs of
    adapted tokens (ReFT's 'fN+lM' windows) stay as they were. A prompt with plain spans (a recorded conversation's
    earlier turns) shares its first run only; its later tokens are packed like a completion's, exactly as well."""
    real = attention_mask.sum(-1).tolist()
    plain = ~prompt_mask.bool()
    lengths = torch.where(plain.any(-1), plain.int().argmax(-1), prompt_mask.shape[1]).tolist()  # the first run's end
    ids = input_ids.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, (length, n) in enumerate(zip(lengths, real)):
        if length == 0 or n < length or not bool(attention_mask[b, :n].bool().all()) or bool(prompt_mask[b, n:].any()):
            raise ValueError("shared prompt packing needs rows laid out as [prompt | completion | padding]")
        key = tuple(ids[b][:length]) if row_keys is None else (row_keys[b], *ids[b][:length])
        groups.setdefault(key, []).append(b)
    if len(groups) == len(ids):
        return None
    widths = [lengths[members[0]] + sum(real[b] - lengths[b] for b in members) for members in groups.values()]
    width = max(widths)
    num_rows = len(groups)
    device = input_ids.device
    packed_ids = torch.zeros(num_rows, width, dtype=input_ids.dtype)
    position_ids = torch.zeros(num_rows, width, dtype=torch.long)
    packed_prompt = torch.zeros(num_rows, width, dtype=torch.bool)
    allowed = torch.zeros(num_rows, width, width, dtype=torch.bool)
    rows, columns, batch_index, kept_index = [], [], [], []
    for r, (key, members) in enumerate(groups.items()):
        prompt = key if row_keys is None else key[1:]
        length = len(prompt)
        packed_ids[r, :length] = torch.tensor(prompt, dtype=input_ids.dtype)
        position_ids[r, :length] = torch.arange(length)
        packed_prompt[r, :length] = True
        allowed[r, :length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
        start = length
        for b in members:
            size = real[b] - length
            end = start + size
            packed_ids[r, start:end] = input_ids[b, length : real[b]].cpu()
            packed_prompt[r, start:end] = prompt_mask[b, length : real[b]].cpu()  # a multi-turn row's adapted tool tokens
            position_ids[r, start:end] = torch.arange(length, length + size)
            allowed[r, start:end, :length] = True
            allowed[r, start:end, start:end] = torch.ones(size, size, dtype=torch.bool).tril()
            # the last prompt token's logits (predicting the first completion token), then each completion token's
            needed = [(length - 1, length - 1)] + [(start + k, length + k) for k in range(size)]
            for column, original in needed:
                if original < first:  # before what the caller keeps: a prompt with plain spans (a recorded chat's
                    continue  # earlier turns) shares only its first run, and the rest of it is packed as a completion
                rows.append(r)
                columns.append(column)
                batch_index.append(b)
                kept_index.append(original - first)
            start = end
        pad = torch.arange(widths[r], width)
        allowed[r, pad, pad] = True  # padding attends to itself only (a fully masked row would give NaN)
    mask = torch.zeros(num_rows, 1, width, width, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return PackedPrompts(
        input_ids=packed_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
        prompt_mask=packed_prompt.to(device), rows=as_long(rows), columns=as_long(columns),
        targets=(as_long(batch_index), as_long(kept_index)), source_rows=[members[0] for members in groups.values()],
    )


def shared_prompt_logits(preft_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor,
                         keep: int, tenants: list | None = None) -> torch.Tensor | None:
    """(B, keep, V) logits of the last `keep` positions, each prompt computed once; 0 at positions no loss reads (prompt
    interior, padding). None when no prompt repeats in the batch (the caller runs the plain forward). With `tenants`
    (each row's tenant, for a TenantPreftModel) a prompt is shared only within a tenant."""
    first = input_ids.shape[1] - keep
    dtype = next(preft_model.base_model.parameters()).dtype
    packed = pack_prompts(input_ids, attention_mask, prompt_mask, first, dtype, tenants)
    if packed is None:
        return None
    extra = {} if tenants is None else {"tenants": [tenants[b] for b in packed.source_rows]}
    hidden = preft_model.hidden_states(packed.input_ids, packed.attention_mask, packed.prompt_mask, packed.position_ids, **extra)
    logits = preft_model.base_model.lm_head(hidden[packed.rows, packed.columns])  # (N, V), only where needed
    out = torch.zeros(input_ids.shape[0], keep, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return out.index_put(packed.targets, logits)
