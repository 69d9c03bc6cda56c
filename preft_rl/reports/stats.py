"""Paired comparisons of per-problem scores: before vs after training, or one method vs another.

Held-out accuracy is a mean of 0/1 scores over the same problems before and after, so the honest error bar
on the change is a paired one: resample problems (not scores) with replacement and recompute the mean change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairedChange:
    """Mean score before and after, their difference, and a bootstrap confidence interval of the difference."""

    before: float
    after: float
    change: float
    low: float
    high: float
    confidence: float
    num_items: int

    def describe(self, name: str) -> str:
        percent = round(100 * self.confidence)
        return (f"{name}: {self.before:.3f} -> {self.after:.3f} (change {self.change:+.3f}, "
                f"{percent}% CI [{self.low:+.3f}, {self.high:+.3f}], {self.num_items} problems)")

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def paired_bootstrap(
    before: Sequence[float], after: Sequence[float], *, num_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> PairedChange:
    """Percentile bootstrap of mean(after - before) over items resampled with replacement.

    `before[i]` and `after[i]` score the same item i. None/NaN scores count as 0 (no answer is a wrong answer).

    >>> r = paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1])
    >>> (r.change, r.low, r.high)
    (1.0, 1.0, 1.0)
    """
    if len(before) != len(after):
        raise ValueError(f"paired_bootstrap needs scores of the same items: {len(before)} before, {len(after)} after")
    if not before:
        raise ValueError("paired_bootstrap needs at least one item")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1), e.g. 0.95")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples} must be >= 1")
    b, a = _scores(before), _scores(after)
    diff = a - b  # (n,)
    n = diff.numel()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (num_resamples, n), generator=generator)  # (R, n) resampled items
    means = diff[index].mean(dim=1)  # (R,)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype)).tolist()
    return PairedChange(
        before=b.mean().item(), after=a.mean().item(), change=diff.mean().item(), low=low, high=high, confidence=confidence, num_items=n
    )


def _scores(values: Sequence[float | None]) -> torch.Tensor:
    out = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
    return torch.tensor(out, dtype=torch.float64)
