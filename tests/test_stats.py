"""The paired bootstrap behind the example's and the study's confidence intervals, against cases computed by hand."""

import math

import pytest

from preft_rl.reports.stats import paired_bootstrap


def test_every_item_improves_gives_a_point_interval():
    r = paired_bootstrap([0, 0, 0], [1, 1, 1])
    assert (r.before, r.after, r.change, r.low, r.high) == (0.0, 1.0, 1.0, 1.0, 1.0)


def test_two_items_resample_distribution():
    # d = [1, 0]: a resample of 2 has mean 0, 0.5 or 1 with probability 1/4, 1/2, 1/4.
    wide = paired_bootstrap([0, 0], [1, 0], num_resamples=20_000)
    assert (wide.change, wide.low, wide.high) == (0.5, 0.0, 1.0)  # 2.5% and 97.5% fall in the end masses
    narrow = paired_bootstrap([0, 0], [1, 0], num_resamples=20_000, confidence=0.4)
    assert (narrow.low, narrow.high) == (0.5, 0.5)  # the 30% and 70% quantiles both fall in the middle mass


def test_large_sample_matches_the_normal_approximation():
    # 200 problems: 10 gained, 2 lost. change = 8/200 = 0.04; var(d) = 12/200 - 0.04^2 = 0.0584;
    # se = sqrt(0.0584 / 200) = 0.01709; 95% normal interval 0.04 -/+ 1.96 se = [0.0065, 0.0735].
    before = [0] * 10 + [1] * 2 + [0] * 188
    after = [1] * 10 + [0] * 2 + [0] * 188
    r = paired_bootstrap(before, after, num_resamples=20_000)
    assert r.change == pytest.approx(0.04)
    assert r.low == pytest.approx(0.04 - 1.96 * math.sqrt(0.0584 / 200), abs=0.006)
    assert r.high == pytest.approx(0.04 + 1.96 * math.sqrt(0.0584 / 200), abs=0.006)
    assert r.num_items == 200
    assert r.describe("strict").startswith("strict: 0.010 -> 0.050 (change +0.040, 95% CI [+0.0")


def test_missing_scores_count_as_wrong_and_bad_input_is_named():
    assert paired_bootstrap([None, float("nan")], [1, 1]).change == 1.0
    with pytest.raises(ValueError, match="2 before, 3 after"):
        paired_bootstrap([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="confidence=1.5"):
        paired_bootstrap([0], [1], confidence=1.5)
