"""The forgetting-against-drift fit (`minorsft_trl.drift.forgetting`) against hand-computed values."""

import json
import math

import pytest

from minorsft_trl.drift import forgetting
from minorsft_trl.drift.forgetting import Point


def test_the_fit_through_the_origin_is_the_least_squares_slope_with_its_interval():
    # y = 2x + residuals (+0.1, -0.1, +0.1) at x = 1, 2, 3: slope = sum(xy) / sum(x^2) = (2.1 + 7.8 + 18.3) / 14
    points = [Point("a", "sft", x, y, None) for x, y in ((1, 2.1), (2, 3.9), (3, 6.1))]
    fit = forgetting.fit_through_origin(points, "nll_change")
    slope = (2.1 + 7.8 + 18.3) / 14
    residuals = [2.1 - slope, 3.9 - 2 * slope, 6.1 - 3 * slope]
    variance = sum(r * r for r in residuals) / 2
    half = 4.303 * math.sqrt(variance / 14)  # t(2) at 0.975, to three decimals as the table has it
    assert (fit.slope, fit.low, fit.high, fit.n) == pytest.approx((slope, slope - half, slope + half, 3))
    assert fit.r_squared == pytest.approx(1 - sum(r * r for r in residuals) / (2.1**2 + 3.9**2 + 6.1**2))
    assert forgetting.fit_through_origin(points[:2], "nll_change") is None
    assert forgetting.fit_through_origin(points, "accuracy_lost") is None


def test_points_keep_only_the_full_vocabulary_forward_kl_and_read_the_accuracy_lost(tmp_path):
    results = {
        "base": {"other_task_accuracy": 0.6},
        "runs": [
            {"method": "sft", "forward_kl": 1.0, "forward_kl_source": "eval_forward_kl", "nll_change": 0.1,
             "other_task_accuracy": 0.45},
            {"method": "sft", "forward_kl": 2.0, "forward_kl_source": "eval_forward_kl_sampled", "nll_change": 0.2},
        ],
    }  # fmt: skip
    path = tmp_path / "block" / "results.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    shared = tmp_path / "other-block" / "results.json"  # a block sharing the first run through the cache
    shared.parent.mkdir()
    shared.write_text(json.dumps({"runs": results["runs"][:1]}))
    (point,) = forgetting.points_of([path, shared])
    assert (point.source, point.forward_kl, point.nll_change) == ("block", 1.0, 0.1)  # named by its folder
    assert point.accuracy_lost == pytest.approx(15.0)


def test_a_budgets_cost_is_read_from_the_fit_and_from_the_runs_that_ended_near_it():
    points = [Point("a", "sft", x, 0.1 * x, None) for x in (0.45, 0.5, 0.55, 1.0, 2.0)]
    text, payload = forgetting.report(points, (0.5, 4.0))
    half, far = payload["budgets"]
    assert half["nll_change"]["fit"] == pytest.approx(0.05)
    assert half["nll_change"]["near"]["n"] == 3 and half["nll_change"]["near"]["mean"] == pytest.approx(0.05)
    assert far["nll_change"]["near"]["n"] == 0 and "no run" in text
