"""The method comparison's statistics (`minorsft_trl.drift.stats`) and its summary (`minorsft_trl.drift.report`)
against hand-computed values."""

import math

import pytest

from minorsft_trl.drift.grid import make_grid
from minorsft_trl.drift.report import matched_table, summarise
from minorsft_trl.drift.stats import (
    interpolate_at,
    paired_difference,
    pareto_front,
    seeds_to_exclude_zero,
    t_interval,
)


def test_t_interval_of_three_seeds():
    # mean 2, sample sd 1, t(2 df) = 4.303: half-width 4.303 / sqrt(3) = 2.4843
    interval = t_interval([1.0, 2.0, 3.0])
    assert (interval.mean, interval.n) == (2.0, 3)
    assert interval.high - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert interval.low == pytest.approx(2.0 - 4.303 / math.sqrt(3), rel=1e-6)


def test_one_value_has_no_interval_and_none_are_left_out():
    assert math.isnan(t_interval([5.0]).low) and t_interval([5.0]).mean == 5.0
    assert t_interval([None, 1.0, 3.0]).n == 2
    assert t_interval([]).format() == "n/a"


def test_paired_difference_cancels_what_the_seeds_share():
    # Seeds move both methods alike (+10, +20, +30); the method adds exactly 0.5: a zero-width interval at 0.5
    baseline = {0: 10.0, 1: 20.0, 2: 30.0}
    method = {seed: value + 0.5 for seed, value in baseline.items()}
    difference = paired_difference(method, baseline)
    assert difference.mean == pytest.approx(0.5) and difference.high - difference.low == pytest.approx(0.0)
    assert difference.excludes_zero()
    # Unpaired, each method's own interval is 50 wide: the seeds' spread would hide the difference
    assert t_interval(list(method.values())).high - t_interval(list(method.values())).low > 40


def test_paired_difference_uses_the_seeds_both_have():
    assert paired_difference({0: 1.0, 1: 2.0, 2: 9.0}, {0: 0.0, 1: 1.0}).n == 2


def test_the_seeds_that_would_settle_a_difference_within_noise():
    # Differences +1, -0.5, +2 over 3 seeds: mean 0.833, sd 1.258 (its interval holds 0). At the same mean and sd, m
    # seeds leave 0 out once t(m - 1) x 1.258 / sqrt(m) < 0.833: t(10) / sqrt(11) = 0.672 x 1.258 = 0.845 does not,
    # t(11) / sqrt(12) = (1.96 + 2.4 / 11) / 3.464 = 0.629 x 1.258 = 0.791 does
    within_noise = t_interval([1.0, -0.5, 2.0])
    assert within_noise.low < 0 < within_noise.high
    assert seeds_to_exclude_zero(within_noise) == 12
    assert seeds_to_exclude_zero(within_noise, most=11) is None  # more than that many: not to be settled by seeds
    # Nothing to estimate from: one seed, a mean of 0
    assert seeds_to_exclude_zero(t_interval([1.0])) is None
    assert seeds_to_exclude_zero(t_interval([1.0, -1.0])) is None


def test_interpolation_is_linear_between_points_and_refuses_to_extrapolate():
    points = [(0.6, 0.1), (0.8, 0.2), (0.9, 0.5)]  # (accuracy, drift) at rising learning rates
    assert interpolate_at(points, 0.7) == pytest.approx(0.15)
    assert interpolate_at(points, 0.85) == pytest.approx(0.35)
    assert interpolate_at(points, 0.9) == pytest.approx(0.5)
    assert interpolate_at(points, 0.95) is None and interpolate_at(points, 0.5) is None
    assert interpolate_at([(0.7, 0.3)], 0.7) == 0.3 and interpolate_at([(0.7, 0.3)], 0.6) is None


def test_on_a_plateau_the_drift_is_that_of_the_smallest_learning_rate_reaching_the_target():
    # Accuracy 93.5 -> 98.5 -> 98.5 (a plateau) while drift climbs 1.4 -> 2.5 -> 4.3: 96 is reached half way up the
    # first segment (1.95), not on a mean of the plateau's two drifts (1.4 + (3.4 - 1.4) / 2 = 2.4)
    assert interpolate_at([(93.5, 1.4), (98.5, 2.5), (98.5, 4.3)], 96.0) == pytest.approx(1.95)
    # Noise: accuracy dips at the largest rate; 98.2 is first reached between the first two rates
    assert interpolate_at([(93.5, 1.4), (98.5, 2.5), (98.0, 4.3)], 98.2) == pytest.approx(1.4 + 1.1 * 4.7 / 5)


def test_pareto_front_keeps_the_points_nothing_beats():
    # (accuracy, drift): the second is beaten by the first (less accurate, more drift)
    points = [(0.9, 0.2), (0.8, 0.3), (0.95, 0.5), (0.7, 0.1)]
    assert pareto_front(points) == [0, 2, 3]


def fake_runs(method: str, lr: float, accuracy: list[float], drift: list[float], trained_lr=None):
    """One run per seed, with the measures the summary reads."""
    return [
        {
            "method": method, "learning_rate": lr, "trained_lr": trained_lr or lr, "seed": seed,
            "accuracy": a, "heldout_deviation": d, "nll_change": d / 10, "forward_kl": d / 100,
            "train_deviation": 1.0, "mean_minor_weight": 0.7 if method == "minor_sft" else None,
        }
        for seed, (a, d) in enumerate(zip(accuracy, drift, strict=True))
    ]  # fmt: skip


def test_block_summary_pairs_by_seed_matches_accuracy_and_compares_with_the_step_size_control():
    grid = make_grid(("sft", "minor_sft"), (1e-4, 1e-3), (0, 1, 2), step_control=1e-3)
    runs = (
        fake_runs("sft", 1e-4, [0.50, 0.60, 0.70], [1.0, 2.0, 3.0])
        + fake_runs("sft", 1e-3, [0.70, 0.80, 0.90], [3.0, 4.0, 5.0])
        + fake_runs("minor_sft", 1e-4, [0.50, 0.60, 0.70], [0.5, 1.5, 2.5])
        + fake_runs("minor_sft", 1e-3, [0.70, 0.80, 0.90], [2.0, 3.0, 4.0])
        + fake_runs("step_control", 1e-3, [0.60, 0.70, 0.80], [2.0, 3.0, 4.0], trained_lr=7e-4)
    )
    summary = summarise(runs, grid)
    paired = {(p["method"], p["learning_rate"]): p for p in summary["paired"]}
    # Minor SFT - SFT, seed by seed: exactly -0.5 and -1.0 of held-out m_theta, no accuracy difference
    assert paired[("minor_sft", 1e-4)]["heldout_deviation"]["mean"] == pytest.approx(-0.5)
    assert paired[("minor_sft", 1e-3)]["heldout_deviation"]["high"] == pytest.approx(-1.0)
    assert paired[("minor_sft", 1e-3)]["accuracy"]["mean"] == pytest.approx(0.0)
    # Both methods span 60-80% (seed means): matched at 70%, the middle of the overlap
    matched = {row["method"]: row for row in summary["matched"]}
    assert matched["sft"]["target"] == pytest.approx(70.0)
    # SFT at 70%: seed 0 -> its lr 1e-3 point, seed 1 -> halfway between its two, seed 2 -> its lr 1e-4 point
    assert matched["sft"]["heldout_deviation"]["mean"] == pytest.approx(3.0)
    assert matched["minor_sft"]["heldout_deviation"]["mean"] == pytest.approx((2.0 + 2.25 + 2.5) / 3)
    assert matched["minor_sft"]["heldout_deviation"]["mean"] < matched["sft"]["heldout_deviation"]["mean"]
    assert [(row["seeds_reaching"], row["seeds"]) for row in summary["matched"]] == [(3, 3), (3, 3)]
    # The control: Minor SFT minus SFT at its mean step, paired by seed (+10 points, equal drift)
    assert summary["control"][0]["accuracy"]["mean"] == pytest.approx(10.0)
    assert summary["control"][0]["heldout_deviation"]["mean"] == pytest.approx(0.0)
    assert (summary["control"][0]["learning_rate"], summary["control"][0]["trained_lr"]) == (1e-3, 7e-4)


def test_matched_accuracy_counts_the_seeds_that_do_not_reach_it():
    grid = make_grid(("sft", "minor_sft"), (1e-4, 1e-3), (0, 1, 2), step_control=False)
    runs = (
        fake_runs("sft", 1e-4, [0.50, 0.60, 0.70], [1.0, 2.0, 3.0])
        + fake_runs("sft", 1e-3, [0.70, 0.80, 0.90], [3.0, 4.0, 5.0])
        # Seed means 60% and 80% as SFT's (target 70%), but seed 2 spans 75-90%: it never was at 70%
        + fake_runs("minor_sft", 1e-4, [0.45, 0.60, 0.75], [0.5, 1.5, 2.5])
        + fake_runs("minor_sft", 1e-3, [0.70, 0.80, 0.90], [2.0, 3.0, 4.0])
    )
    matched = {row["method"]: row for row in summarise(runs, grid)["matched"]}
    assert matched["minor_sft"]["target"] == pytest.approx(70.0)
    assert (matched["minor_sft"]["seeds_reaching"], matched["minor_sft"]["seeds"]) == (2, 3)
    assert matched["minor_sft"]["heldout_deviation"]["mean"] == pytest.approx((2.0 + 2.25) / 2)
    table = matched_table(list(matched.values()))
    assert table[2].startswith("| SFT | 3 of 3 |") and table[3].startswith("| Minor SFT | 2 of 3 |")
