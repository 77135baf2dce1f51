"""`minorsft-trl compare`: its report on synthetic runs with known answers, bad input refused before any training, and
a comparison end to end on a local `.jsonl` with a tiny model, resumed from its cache."""

import json
import math
import re
import shutil

import pytest
import yaml
from tiny import CHATML_TEMPLATE, prompt_completion_dataset, write_recipe

from minorsft_trl.cli import command as cli
from minorsft_trl.drift import compare, report, stats
from minorsft_trl.drift.compare import make_grid
from minorsft_trl.errors import InputError


def synthetic_runs(method, lr, answer_nll, drift, accuracy=None, trained_lr=None):
    """One run per seed with the measures the summary reads."""
    return [
        {
            "method": method, "learning_rate": lr, "trained_lr": trained_lr or lr, "seed": seed,
            "answer_nll": nll, "forward_kl": d, "heldout_deviation": 10 * d, "train_deviation": 1.0,
            "accuracy": None if accuracy is None else accuracy[seed], "clipped_fraction": 0.0,
            "mean_minor_weight": 0.5 if method == "minor_sft" else None,
        }
        for seed, (nll, d) in enumerate(zip(answer_nll, drift, strict=True))
    ]  # fmt: skip


# ------------------------------------------------------------------ the report


def test_one_seed_says_so_and_prints_no_interval(tmp_path):
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0,))
    runs = synthetic_runs("sft", 1e-3, [2.0], [0.3]) + synthetic_runs("minor_sft", 1e-3, [2.5], [0.1])
    runs += synthetic_runs("step_control", 1e-3, [2.2], [0.2], trained_lr=5e-4)
    text = report.write_outputs({"runs": runs}, grid, tmp_path)
    assert "one seed: no intervals" in text
    assert "[" not in text.split("| method |", 1)[1], "an interval printed from one seed"
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]  # valid JSON: NaN written as null
    paired = summary["paired"][0]
    assert (paired["answer_nll"]["mean"], paired["answer_nll"]["low"], paired["answer_nll"]["n"]) == (0.5, None, 1)
    assert (tmp_path / "gain_vs_drift.png").stat().st_size > 0


def test_one_seed_of_a_task_has_accuracy_intervals_over_the_questions_paired_by_question():
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0,), step_control=False)
    runs = synthetic_runs("sft", 1e-3, [2.0], [0.3], accuracy=[0.25]) + synthetic_runs(
        "minor_sft", 1e-3, [2.5], [0.1], accuracy=[0.75]
    )
    runs[0]["accuracy_outcomes"], runs[1]["accuracy_outcomes"] = [1, 0, 0, 0], [1, 1, 0, 1]
    summary = report.summarise(runs, grid)
    # Minor SFT - SFT by question: 0, 1, 0, 1 (points x 100): mean 50, sd 57.735, 4 questions, t(3) = 3.182
    difference = summary["paired"][0]["accuracy"]
    half = stats.t_quantile(3) * 57.73502691896258 / 2
    assert (difference["mean"], difference["n"]) == (50.0, 4)
    assert (difference["low"], difference["high"]) == pytest.approx((50 - half, 50 + half))
    # SFT: 1 of 4 right, Wilson's 95% interval [4.56%, 69.94%] (a t interval would reach below 0)
    sft = summary["configurations"][0]["accuracy"]
    assert (sft["mean"], sft["n"]) == (25.0, 4)
    assert (sft["low"], sft["high"]) == pytest.approx((4.56, 69.94), abs=0.01)
    # The drift measures have no interval from one seed
    assert math.isnan(summary["paired"][0]["forward_kl"]["low"])
    assert "accuracy intervals are over the held-out questions" in report.markdown({"runs": runs}, summary, grid)


def two_methods_two_rates():
    """SFT and Minor SFT at two learning rates, 3 seeds: seeds shift both methods alike; Minor SFT's NLL is 0.5 higher
    (worse) and its drift lower, at both rates."""
    grid = make_grid(("sft", "minor_sft"), (1e-4, 1e-3), (0, 1, 2), step_control=False)
    runs = (
        synthetic_runs("sft", 1e-4, [3.0, 3.1, 3.2], [0.1, 0.2, 0.3])
        + synthetic_runs("sft", 1e-3, [2.0, 2.1, 2.2], [0.5, 0.6, 0.7])
        + synthetic_runs("minor_sft", 1e-4, [3.5, 3.6, 3.7], [0.15, 0.25, 0.35])
        + synthetic_runs("minor_sft", 1e-3, [2.5, 2.6, 2.7], [0.3, 0.4, 0.5])
    )
    return grid, runs


def test_paired_differences_and_matched_gain_when_lower_answer_nll_is_better():
    grid, runs = two_methods_two_rates()
    summary = report.summarise(runs, grid)
    assert summary["gain"] == "answer_nll"
    paired = {p["learning_rate"]: p for p in summary["paired"]}
    assert paired[1e-3]["answer_nll"]["mean"] == pytest.approx(0.5)
    assert paired[1e-3]["answer_nll"]["high"] - paired[1e-3]["answer_nll"]["low"] == pytest.approx(0.0, abs=1e-9)
    assert paired[1e-3]["forward_kl"]["mean"] == pytest.approx(-0.2)
    # Seed-mean NLL ranges: SFT 2.1-3.1, Minor SFT 2.6-3.6; the overlap 2.6-3.1, matched at 2.85
    matched = {row["method"]: row for row in summary["matched"]}
    assert matched["sft"]["target"] == pytest.approx(2.85)
    # SFT, seed 0: NLL 2.0 (KL 0.5) to 3.0 (KL 0.1); at 2.85, 85% of the way: KL 0.5 - 0.85 * 0.4 = 0.16; seed 1
    # 0.6 - 0.75 * 0.4 = 0.30; seed 2 0.7 - 0.65 * 0.4 = 0.44
    assert matched["sft"]["forward_kl"]["mean"] == pytest.approx((0.16 + 0.30 + 0.44) / 3)
    # Minor SFT, seed 0: NLL 2.5 (0.3) to 3.5 (0.15); at 2.85, 35%: 0.3 - 0.35 * 0.15 = 0.2475; 0.3625; 0.4775
    assert matched["minor_sft"]["forward_kl"]["mean"] == pytest.approx((0.2475 + 0.3625 + 0.4775) / 3)
    assert [(row["seeds_reaching"], row["seeds"]) for row in summary["matched"]] == [(3, 3), (3, 3)]
    # Lower NLL is better: Minor SFT at 1e-4 (NLL 3.6, KL 0.25) is beaten by SFT at 1e-4 (3.1, 0.2); read the other
    # way round, its NLL would be the best of all and keep it on the front
    assert set(summary["pareto_front"]) == {("sft", 1e-3), ("sft", 1e-4), ("minor_sft", 1e-3)}
    text = report.markdown({"runs": runs}, summary, grid)
    assert "held-out answer NLL 2.850" in text and "lower is better" in text


def test_matched_gain_and_pareto_when_higher_accuracy_is_better():
    grid = make_grid(("sft", "minor_sft"), (1e-4, 1e-3), (0, 1), step_control=False)
    runs = (
        synthetic_runs("sft", 1e-4, [3.0, 3.0], [0.1, 0.1], accuracy=[0.5, 0.5])
        + synthetic_runs("sft", 1e-3, [2.0, 2.0], [0.5, 0.5], accuracy=[0.9, 0.9])
        + synthetic_runs("minor_sft", 1e-4, [3.0, 3.0], [0.05, 0.05], accuracy=[0.6, 0.6])
        + synthetic_runs("minor_sft", 1e-3, [2.0, 2.0], [0.25, 0.25], accuracy=[0.8, 0.8])
    )
    summary = report.summarise(runs, grid)
    assert summary["gain"] == "accuracy"
    matched = {row["method"]: row for row in summary["matched"]}
    assert matched["sft"]["target"] == pytest.approx(70.0)  # overlap 60-80%
    assert matched["sft"]["forward_kl"]["mean"] == pytest.approx(0.3)
    assert matched["minor_sft"]["forward_kl"]["mean"] == pytest.approx(0.15)
    # Higher accuracy is better: SFT 1e-3 (90%), Minor SFT 1e-4 (least KL) and Minor SFT 1e-3 (80%, KL 0.25 < 0.5);
    # SFT 1e-4 (50%, KL 0.1) is beaten by Minor SFT 1e-4 (60%, KL 0.05)
    assert set(summary["pareto_front"]) == {("sft", 1e-3), ("minor_sft", 1e-4), ("minor_sft", 1e-3)}


def test_each_method_at_its_best_learning_rate_against_sft_at_its_own():
    # SFT peaks at 5e-4 (interior); Minor SFT keeps rising to 2.5e-3, the grid's edge: starred, a better rate may lie
    # beyond. Accuracy by seed: SFT at 5e-4 90/92/94, Minor SFT at 2.5e-3 91/92/96 -> differences 1, 0, 2
    grid = make_grid(("sft", "minor_sft"), (1e-4, 5e-4, 2.5e-3), (0, 1, 2), step_control=False)
    runs = (
        synthetic_runs("sft", 1e-4, [3.0] * 3, [0.1] * 3, accuracy=[0.80, 0.81, 0.82])
        + synthetic_runs("sft", 5e-4, [2.0] * 3, [0.5, 0.6, 0.7], accuracy=[0.90, 0.92, 0.94])
        + synthetic_runs("sft", 2.5e-3, [2.5] * 3, [1.5] * 3, accuracy=[0.85, 0.86, 0.87])
        + synthetic_runs("minor_sft", 1e-4, [3.0] * 3, [0.1] * 3, accuracy=[0.70, 0.70, 0.70])
        + synthetic_runs("minor_sft", 5e-4, [2.0] * 3, [0.4] * 3, accuracy=[0.88, 0.88, 0.88])
        + synthetic_runs("minor_sft", 2.5e-3, [2.0] * 3, [1.0, 1.2, 1.4], accuracy=[0.91, 0.92, 0.96])
    )
    summary = report.summarise(runs, grid)
    best = {row["method"]: row for row in summary["best"]}
    assert (best["sft"]["learning_rate"], best["sft"]["interior"]) == (5e-4, True)
    assert (best["minor_sft"]["learning_rate"], best["minor_sft"]["interior"]) == (2.5e-3, False)
    assert best["sft"]["accuracy"]["mean"] == pytest.approx(92.0)
    assert "against_sft" not in best["sft"]
    difference = best["minor_sft"]["against_sft"]
    assert difference["accuracy"]["mean"] == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    assert difference["accuracy"]["n"] == 3 and difference["accuracy"]["low"] < 1.0 < difference["accuracy"]["high"]
    assert difference["forward_kl"]["mean"] == pytest.approx(0.6)  # 1.0-0.5, 1.2-0.6, 1.4-0.7: 0.5, 0.6, 0.7
    text = report.markdown({"runs": runs}, summary, grid)
    assert "| Minor SFT * | 0.0025 |" in text and "Each at its best minus SFT at its best (lr 0.0005)" in text
    # Of equal gains, the smaller learning rate: listed last in the grid, it is still SFT's best
    tied = [
        dict(run, accuracy=0.92) if run["method"] == "sft" and run["learning_rate"] > 1e-4 else run for run in runs
    ]
    grid = make_grid(("sft", "minor_sft"), (2.5e-3, 1e-4, 5e-4), (0, 1, 2), step_control=False)
    assert report.summarise(tied, grid)["best"][0]["learning_rate"] == 5e-4


def test_steps_clipped_are_reported_as_a_percentage_of_the_steps():
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0, 1, 2), step_control=False)
    runs = synthetic_runs("sft", 1e-3, [2.0, 2.1, 2.2], [0.3, 0.4, 0.5]) + synthetic_runs(
        "minor_sft", 1e-3, [2.5, 2.4, 2.3], [0.1, 0.2, 0.3]
    )
    for run, clipped in zip(runs, [1.0, 0.92, 0.96, 0.7, 0.62, 0.66], strict=True):
        run["clipped_fraction"] = run["grad_norm_over_1"] = clipped
    summary = report.summarise(runs, grid)
    assert summary["configurations"][0]["clipped_fraction"]["mean"] == pytest.approx(96.0)
    assert summary["paired"][0]["clipped_fraction"]["mean"] == pytest.approx(-30.0)  # percentage points
    table = report.markdown({"runs": runs}, summary, grid).splitlines()
    header = next(line for line in table if line.startswith("| method |"))
    assert "| steps clipped (%) |" in header and "| steps with grad norm > 1 (%) |" in header
    sft_row = next(line for line in table if line.startswith("| SFT |"))
    cells = dict(zip(header.split(" | "), sft_row.split(" | "), strict=True))
    assert cells["steps clipped (%)"].startswith("96 ["), cells


def test_the_wall_time_keeps_the_runs_own_and_says_which_were_trained_earlier():
    runs = [{"wall_seconds": 120.0, "from_cache": True}, {"wall_seconds": 60.0, "from_cache": False}]
    assert report.wall_time(runs, 66.0) == (
        "Wall time of the runs: 3.0 min (1 of the 2 runs, 2.0 min of it, trained earlier and read from the cache); "
        "of this call: 1.1 min."
    )


def test_the_log_history_says_how_often_clipping_bound_and_how_often_the_default_would_have():
    history = [
        {"loss": 1.0, "grad_norm": 0.5, "step": 1, "minor_weight": 0.9},
        {"loss": 0.9, "grad_norm": 1.5, "step": 2, "minor_weight": 0.7},
        {"loss": 0.8, "grad_norm": 3.0, "step": 3, "minor_weight": 0.5},
        {"loss": 0.7, "grad_norm": 0.9, "step": 4, "minor_weight": 0.3},
        {"eval_loss": 0.7, "step": 4},
    ]
    clipped_at_2 = compare.read_log_history(history, max_grad_norm=2.0)
    assert (clipped_at_2["clipped_fraction"], clipped_at_2["grad_norm_over_1"]) == (0.25, 0.5)
    assert clipped_at_2["mean_minor_weight"] == pytest.approx(0.6)
    assert [point["grad_norm"] for point in clipped_at_2["curve"]] == [0.5, 1.5, 3.0, 0.9]
    unclipped = compare.read_log_history(history, max_grad_norm=0.0)
    assert (unclipped["clipped_fraction"], unclipped["grad_norm_over_1"]) == (0.0, 0.5)


def test_the_training_curves_of_the_runs_are_drawn_when_they_were_logged(tmp_path):
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0,))
    runs = synthetic_runs("sft", 1e-3, [2.0], [0.3]) + synthetic_runs("minor_sft", 1e-3, [2.5], [0.1])
    report.write_outputs({"runs": runs}, grid, tmp_path / "no_curves")
    assert not (tmp_path / "no_curves" / "training_curves.png").exists()
    for run in runs:
        run["curve"] = [{"step": step, "loss": 1 / step, "grad_norm": 2.0 / step} for step in (1, 2, 3)]
    runs[1]["curve"][0]["minor_weight"] = 0.9
    report.write_outputs({"runs": runs}, grid, tmp_path / "curves", max_grad_norm=1.0)
    assert (tmp_path / "curves" / "training_curves.png").stat().st_size > 0


def test_the_step_size_control_is_named_once_by_the_learning_rate_it_trained_at(tmp_path):
    """The control of Minor SFT at lr 5e-4 trains at 5e-4 times Minor SFT's mean weight, 4.8e-4: its table row and
    its legend say 0.00048, once, and never the grid's 0.0005."""
    grid = make_grid(("sft", "minor_sft"), (5e-4,), (0,))
    runs = synthetic_runs("sft", 5e-4, [2.0], [0.3]) + synthetic_runs("minor_sft", 5e-4, [2.5], [0.1])
    runs += synthetic_runs("step_control", 5e-4, [2.2], [0.2], trained_lr=4.8e-4)
    for run in runs:
        run["curve"] = [{"step": step, "loss": 1 / step} for step in (1, 2)]
    table = report.write_outputs({"runs": runs}, grid, tmp_path).splitlines()
    row = next(line for line in table if "mean step" in line)
    assert row.count("0.00048") == 1 and "0.0005 " not in row, row
    legend = [text.get_text() for text in report.curves_figure(runs).axes[0].get_legend().get_texts()]
    assert legend[-1] == "SFT at Minor SFT's mean step lr 0.00048", legend


def shown_tick_labels(axis) -> list:
    """The x tick labels a drawn panel shows: within its limits."""
    low, high = sorted(axis.get_xlim())
    return [
        label
        for label in axis.get_xticklabels()
        if label.get_visible() and label.get_text() and low <= label.get_position()[0] <= high
    ]


def overlapping_tick_labels(axis) -> list[tuple[str, str]]:
    """The neighbouring x tick labels of a drawn panel whose boxes overlap."""
    renderer = axis.figure.canvas.get_renderer()
    labels = shown_tick_labels(axis)
    boxes = [label.get_window_extent(renderer) for label in labels]
    return [
        (labels[i].get_text(), labels[i + 1].get_text())
        for i in range(len(boxes) - 1)
        if boxes[i].overlaps(boxes[i + 1])
    ]


def test_no_tick_labels_of_the_gain_vs_drift_plot_overlap():
    """Three panels side by side, the third a narrow range of small values (an NLL change of 0.0032-0.0036 nats/token):
    matplotlib's default ticks there (0.00315, 0.00320, ... every 0.00005) ran into each other. Nor are they so few
    that a panel has no scale to read (a forward KL of 3.9-13.6 once showed only 5 and 10)."""
    grid, runs = two_methods_two_rates()
    for number, run in enumerate(runs):
        run["forward_kl"] = 3.9 + 9.7 * (number // 3) / 3  # the same on each seed of a configuration: no error bars
        run["nll_change"] = 0.0032 + 0.0004 * number / len(runs)
        run["heldout_deviation"] = 0.0001234 + 0.0000065 * number / len(runs)
    figure = report.gain_vs_drift_figure(report.summarise(runs, grid))
    figure.canvas.draw()
    assert [axis.get_xlabel() for axis in figure.axes][2] == "NLL change on held-out text"
    for axis in figure.axes:
        assert len(shown_tick_labels(axis)) >= 3, (axis.get_xlabel(), shown_tick_labels(axis))  # a scale to read
        assert overlapping_tick_labels(axis) == [], axis.get_xlabel()


# ------------------------------------------------------------------ bad input


@pytest.fixture
def recipe(tmp_path, tiny_model_dir):
    """A recipe on the tiny model and a local `.jsonl` with no test split: `test_split_size` holds out 2 of 8."""
    data = tmp_path / "data.jsonl"
    prompt_completion_dataset().to_json(data)
    return write_recipe(tmp_path, tiny_model_dir, dataset_name=str(data), test_split_size=2, max_steps=2)


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("trained")

    monkeypatch.setattr(compare, "train", refuse)
    monkeypatch.setattr(compare, "run_and_measure", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seeds"], "zero seeds: give at least one with --seeds"),
        (["--methods", "sft", "minor_sfft"], "unknown method(s) 'minor_sfft': known ones are sft, minor_sft, sft_dpo"),
        (["--learning_rates", "1e-3", "0"], "a learning rate must be a number > 0, got 0.0"),
        (["--learning_rates", "-1e-3"], "a learning rate must be a number > 0, got -0.001"),
        (["--learnig_rate", "1e-3"], "the recipe does not parse: unrecognized arguments: --learnig_rate"),
        (["--beta", "-1"], "the recipe does not parse: beta must be a finite number > 0, got -1.0"),
        (["--learning_rate", "1e-3"], "--learning_rate is set per run by the grid: use --learning_rates"),
        (["--step_control", "5e-3"], "step_control at learning rate 0.005, where minor_sft does not run"),
        (
            ["--max_forward_kl", "0.5", "--eval_strategy", "steps", "--save_strategy", "steps"],
            "the recipe sets max_forward_kl=0.5, but the comparison trains every run to its end",
        ),
        (
            ["--methods", "sft", "minor_sft", "--target_forward_kls", "0.5"],
            "--target_forward_kls sets the KL anchor's coefficient of sft_kl or asft, and none is among the methods",
        ),
        (["--methods", "sft_kl", "--kl_coefs", "-0.1"], "a kl_coef must be a number >= 0, got -0.1: fix --kl_coefs"),
        (
            ["--methods", "sft_kl", "--target_forward_kls", "0.5", "nan"],
            "a target_forward_kl must be a number > 0 (nats per token of eval_forward_kl), got nan",
        ),
        (
            ["--methods", "sft_kl", "--kl_coefs", "0.1", "--kl_coef", "0.2"],
            "--kl_coef is set per run by --kl_coefs: give the values there, not both",
        ),
        (
            ["--methods", "sft_kl", "--target_forward_kls", "0.5"],
            "a budget steers on evaluations during training, and the recipe sets eval_strategy: no",
        ),
        (["--other_task", "si_conversion"], "--other_task 'si_conversion': give a BIG-bench task as bigbench:<task>"),
    ],
)
def test_bad_input_is_refused_before_any_training(extra, message, recipe, tmp_path, capsys, no_training):
    argv = ["compare", "--config", str(recipe), "--output_dir", str(tmp_path / "out"), "--learning_rates", "1e-3"]
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minorsft-trl compare: error: ") and message in err, err


def test_data_without_a_held_out_split_is_refused(recipe, tmp_path, capsys, no_training):
    values = yaml.safe_load(recipe.read_text())
    del values["test_split_size"]
    recipe.write_text(yaml.safe_dump(values))
    assert cli.main(["compare", "--config", str(recipe), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "every run is measured on a held-out split" in err and "set `test_split_size`" in err, err


def test_a_recipe_with_a_typo_is_refused(recipe, tmp_path, capsys, no_training):
    recipe.write_text(recipe.read_text() + "learnig_rate: 1.0e-04\n")
    assert cli.main(["compare", "--config", str(recipe), "--output_dir", str(tmp_path / "out")]) == 2
    assert "the recipe does not parse: unknown key(s) in the recipe" in capsys.readouterr().err


def test_the_grid_file_and_the_command_line_which_wins(recipe, tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "methods": ["sft", "sft_kl"],
                "learning_rates": [1e-4, 1e-3],
                "seeds": 4,
                "method_settings": {"sft_kl": {"kl_coef": 0.1}},
            }
        )
    )
    comparison = compare.comparison_from_args(
        ["--config", str(recipe), "--grid", str(grid_file), "--seeds", "0", "1", "--output_dir", "o"]
    )
    grid = comparison.grid
    assert (grid.methods, grid.learning_rates, grid.seeds) == (("sft", "sft_kl"), (1e-4, 1e-3), (0, 1))
    assert grid.step_control == ()  # no minor_sft: no control
    comparison.prepare()
    run = compare.Run("sft_kl", 1e-3, 1)
    training_args = comparison.run_configs(run, 1e-3)[1]
    assert (training_args.loss_type, training_args.kl_coef, training_args.seed, training_args.learning_rate) == (
        "sft_kl",
        0.1,
        1,
        1e-3,
    )
    assert training_args.output_dir == "o/runs/sft_kl-lr0.001-seed1"
    assert training_args.save_strategy == "no" and training_args.eval_strategy == "steps"  # evaluated once, at the end


def test_compare_help_says_it_runs_in_process(capsys):
    assert cli.main(["compare", "-h"]) == 0
    assert "no `accelerate launch`" in capsys.readouterr().out


# ------------------------------------------------------------------ end to end, and resumed


def fake_measures(configs, eval_dataset, accuracy_kind, other_task=None):
    args = configs[1]
    return {
        "forward_kl": args.learning_rate * (1 + args.seed), "forward_kl_source": "eval_forward_kl",
        "answer_nll": 3.0 - args.learning_rate,
        "heldout_deviation": 0.1, "nll_change": None, "train_deviation": 0.2, "clipped_fraction": 0.5,
        "mean_minor_weight": 0.5 if args.loss_type == "minor_sft" else None, "wall_seconds": 30.0,
    }  # fmt: skip


def compare_argv(recipe, out, cache_dir, *learning_rates) -> list[str]:
    """`minorsft-trl compare` of SFT and Minor SFT over 2 seeds on the tiny recipe."""
    return [
        "compare", "--config", str(recipe), "--methods", "sft", "minor_sft", "--seeds", "0", "1",
        "--learning_rates", *learning_rates, "--output_dir", str(out), "--cache_dir", str(cache_dir),
    ]  # fmt: skip


def test_a_second_invocation_reads_every_run_from_the_cache(recipe, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compare, "run_and_measure", lambda *a: calls.append(a[0][1]) or fake_measures(*a))
    argv = compare_argv(recipe, tmp_path / "out", tmp_path / "c", "1e-3")
    assert cli.main(argv) == 0
    assert len(calls) == 6  # 2 methods x 2 seeds, and the control x 2 seeds
    # The control trains at Minor SFT's mean step, 0.001 x 0.5: its folder is named by it, not by 0.001
    control = [args for args in calls if args.loss_type == "nll" and args.learning_rate < 1e-3][0]
    assert control.learning_rate == pytest.approx(0.5e-3)
    assert control.output_dir.endswith("/runs/step_control-lr0.0005-seed0"), control.output_dir
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "Wall time of the runs: 3.0 min; of this call: " in (tmp_path / "out" / "results.md").read_text()
    # One line per run: which run, its gain and forward KL, and its own time
    line = "[1/6] sft lr=0.001 seed=0: answer NLL 2.999, forward KL 0.0010; "
    assert f"\n{line}trained in 30 s\n" in capsys.readouterr().out
    monkeypatch.setattr(compare, "run_and_measure", lambda *a: pytest.fail("trained again"))
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        out.count("; from the cache (trained in 30 s)") == 6 and f"\n{line}from the cache (trained in 30 s)\n" in out
    )
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [{**run, "from_cache": False} for run in again["runs"]] == first["runs"]
    assert all(run["from_cache"] for run in again["runs"]) and again["wall_seconds_of_runs"] == 6 * 30.0
    # The runs' own 3 minutes, as they were trained, and this call's, apart
    wall_time = re.search(r"Wall time of the runs: .*", (tmp_path / "out" / "results.md").read_text()).group()
    assert wall_time.startswith("Wall time of the runs: 3.0 min (trained earlier, read from the cache); of this call:")


def test_compare_end_to_end_on_a_local_jsonl_and_resumed(recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = compare_argv(recipe, out, tmp_path / "cache", "1e-2", "3e-2")
    assert cli.main(argv) == 0
    for name in ("results.md", "results.json", "gain_vs_drift.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 10  # 2 methods x 2 rates x 2 seeds, and the control at 3e-2 x 2 seeds
    for run in results["runs"]:
        assert math.isfinite(run["forward_kl"]) and run["answer_nll"] > 0 and run["train_deviation"] is not None
        assert run["forward_kl_source"] in ("eval_forward_kl", "eval_forward_kl_sampled")
    minor = [
        r["mean_minor_weight"] for r in results["runs"] if r["method"] == "minor_sft" and r["learning_rate"] == 3e-2
    ]
    control = [r for r in results["runs"] if r["method"] == "step_control"]
    assert control[0]["trained_lr"] == pytest.approx(3e-2 * sum(minor) / len(minor))
    text = (out / "results.md").read_text()
    assert "Paired differences against SFT" in text and (
        "Drift at matched held-out answer NLL" in text
        or "Matched gain: the methods' gain ranges do not overlap" in text
    )
    assert "Step-size control" in text and "Pareto front" in text

    def no_training(*args):
        pytest.fail("trained again")

    monkeypatch.setattr(compare, "train", no_training)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("; from the cache (trained in ") == 10


def test_a_run_prints_one_line_on_the_console_and_its_training_log_to_its_folder(recipe, tmp_path, capfd):
    out = tmp_path / "out"
    argv = [
        "compare", "--config", str(recipe), "--methods", "sft", "--seeds", "0", "--learning_rates", "1e-2",
        "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    console = capfd.readouterr()
    log = out / "runs" / "sft-lr0.01-seed0" / "train.log"
    assert f"each run's own log goes to {out}/runs/<run>/train.log" in console.out
    assert re.search(
        r"\n\[1/1\] sft lr=0\.01 seed=0: answer NLL \d\.\d{3}, forward KL \d\.\d{4}; trained in \d+ s\n", console.out
    )
    # The trainer's per-step log and progress bars are the run's, in its folder
    assert "'loss'" not in console.out and "it/s]" not in console.err, console
    assert "'loss'" in log.read_text() and "Model saved to" in log.read_text()


def failing_run(error: BaseException):
    def run(*args):
        print("the run's own output", flush=True)
        raise error

    return run


def test_an_input_error_in_a_run_ends_as_one_sentence(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_and_measure", failing_run(InputError("max_length must be > 0, got 0: fix it.")))
    assert cli.main(compare_argv(recipe, tmp_path / "out", tmp_path / "cache", "1e-3")) == 2
    console = capsys.readouterr()
    assert console.err.endswith("\nminorsft-trl compare: error: max_length must be > 0, got 0: fix it.\n")
    assert "Traceback" not in console.err
    log = tmp_path / "out" / "runs" / "sft-lr0.001-seed0" / "train.log"
    assert f"[1/6] sft lr=0.001 seed=0: failed (its log: {log})" in console.out
    assert "the run's own output" not in console.out and "the run's own output" in log.read_text()


def test_an_error_in_a_run_reaches_the_user_with_where_its_log_is(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_and_measure", failing_run(RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cli.main(compare_argv(recipe, tmp_path / "out", tmp_path / "cache", "1e-3"))
    assert "[1/6] sft lr=0.001 seed=0: failed (its log: " in capsys.readouterr().out


def test_a_run_whose_recipe_evaluates_at_its_last_step_is_not_evaluated_again(recipe, tmp_path, monkeypatch):
    from minorsft_trl import MinorSFTTrainer

    evaluations = []
    evaluate = MinorSFTTrainer.evaluate
    monkeypatch.setattr(
        MinorSFTTrainer, "evaluate", lambda self, *a, **k: evaluations.append(1) or evaluate(self, *a, **k)
    )
    overrides = ["--eval_strategy", "steps", "--eval_steps", "2", "--output_dir", str(tmp_path / "run")]
    result = compare.run_and_measure(compare.parse_recipe(str(recipe), overrides), None, None)
    assert len(evaluations) == 1  # the training loop's, at step 2
    assert result["eval_metrics"]["step"] == 2 and result["answer_nll"] == result["eval_metrics"]["eval_answer_nll"]


# ------------------------------------------------------------------ the run cache's key


@pytest.fixture
def own_files(tmp_path, tiny_model_dir):
    """A copy of the tiny model's folder, a chat template file and a data file, each the recipe's own to edit."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    template = tmp_path / "template.jinja"
    template.write_text(CHATML_TEMPLATE)
    data = tmp_path / "mixture.jsonl"
    prompt_completion_dataset().to_json(data)
    return model_dir, template, data


def key_of(recipe, *overrides) -> dict:
    return compare.recipe_key(compare.parse_recipe(str(recipe), list(overrides)))


@pytest.mark.parametrize(
    "edit",
    [
        "the model's chat_template.jinja",
        "a tokenizer file that is not JSON (merges.txt)",
        "the chat_template_path file",
        "a data file of the mixture (path: json, data_files)",
    ],
)
def test_every_file_a_run_reads_is_in_its_cache_key_by_content(edit, own_files, tmp_path):
    model_dir, template, data = own_files
    mixture = [{"path": "json", "data_files": str(data)}]
    recipe = write_recipe(tmp_path, str(model_dir), chat_template_path=str(template), datasets=mixture)
    before = key_of(recipe)
    if edit.startswith("the model's"):
        (model_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE.replace("<|im_start|>", "<|im_start|> "))
    elif edit.startswith("a tokenizer file"):
        (model_dir / "merges.txt").write_text("#version: 0.2\n")
    elif edit.startswith("the chat_template_path"):
        template.write_text(CHATML_TEMPLATE + "{{ eos_token }}")
    else:
        data.write_text(data.read_text().replace("Paris", "Lyon"))
    assert key_of(recipe) != before, f"{edit} edited, and the run would be read from the cache"


def test_a_moved_file_or_a_hidden_one_keeps_the_cache_key(own_files, tmp_path):
    model_dir, template, _ = own_files
    recipe = write_recipe(tmp_path, str(model_dir), chat_template_path=str(template))
    before = key_of(recipe)
    (model_dir / ".git").mkdir()
    (model_dir / ".git" / "index").write_bytes(b"git's own bookkeeping")
    moved = tmp_path / "elsewhere" / "template.jinja"
    moved.parent.mkdir()
    shutil.move(template, moved)
    assert key_of(recipe, "--chat_template_path", str(moved)) == before


def test_an_edited_chat_template_trains_the_runs_again(own_files, tmp_path, monkeypatch, capsys):
    model_dir, template, _ = own_files
    data = tmp_path / "data.jsonl"
    prompt_completion_dataset().to_json(data)
    recipe = write_recipe(
        tmp_path, str(model_dir), dataset_name=str(data), test_split_size=2, chat_template_path=str(template)
    )
    monkeypatch.setattr(compare, "run_and_measure", fake_measures)
    argv = [*compare_argv(recipe, tmp_path / "out", tmp_path / "cache", "1e-3"), "--step_control", "off"]
    assert cli.main(argv) == 0
    template.write_text(CHATML_TEMPLATE.replace("<|im_end|>", "<|im_end|><|im_end|>"))
    capsys.readouterr()
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("; trained in ") == 4 and "from the cache" not in out, out


def test_a_packaged_recipe_on_the_users_data_drops_its_caps_as_train_does(tmp_path, warnings_of_minorsft):
    """The packaged SmolLM2 recipe caps its BIG-bench demo at 400 / 300 questions: on `--dataset_name` of the user's
    own, every run trains and evaluates on all of it, as `minorsft-trl train` does, and the comparison says so once."""
    own = tmp_path / "own.jsonl"
    prompt_completion_dataset().to_json(own)
    argv = ["--config", "SmolLM2-135M-Instruct/minor_sft/config_lora", "--dataset_name", str(own)]
    comparison = compare.comparison_from_args([*argv, "--test_split_size", "2", "--seeds", "0", "--output_dir", "o"])
    comparison.prepare()
    run = compare.plan(comparison.grid)[0]
    for script_args in (comparison.base[0], comparison.run_configs(run, run.learning_rate)[0]):
        assert (script_args.max_train_examples, script_args.max_eval_examples) == (None, None)
    said = [message for message in warnings_of_minorsft if "limits its own data" in message]
    assert len(said) == 2 and "max_train_examples=400" in said[0] and "max_eval_examples=300" in said[1], said


# ------------------------------------------------------------------ one forward KL estimator per comparison


def test_a_paired_difference_is_never_taken_across_forward_kl_estimators(tmp_path):
    """Full fine-tuning SFT whose reference the precompute released (the sampled-token estimate) against SFT + KL (the
    full-vocabulary KL): the two estimators differ on the samples every run shares, which no seed interval covers."""
    grid = make_grid(("sft", "sft_kl"), (1e-3,), (0, 1, 2))
    sft = synthetic_runs("sft", 1e-3, [2.0, 2.1, 2.2], [-0.043, -0.040, -0.046])
    kl = synthetic_runs("sft_kl", 1e-3, [2.1, 2.2, 2.3], [0.182, 0.180, 0.184])
    for run in sft:
        run["forward_kl_source"] = "eval_forward_kl_sampled"
    for run in kl:
        run["forward_kl_source"] = "eval_forward_kl"
    text = report.write_outputs({"runs": sft + kl}, grid, tmp_path)
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    paired = summary["paired"][0]
    assert paired["forward_kl"]["n"] == 0 and paired["forward_kl_sampled"]["n"] == 0, paired
    assert paired["answer_nll"]["n"] == 3  # the other measures are still paired
    sft_row, kl_row = summary["configurations"]
    assert (sft_row["forward_kl_sampled"]["mean"], kl_row["forward_kl"]["mean"]) == pytest.approx((-0.043, 0.182))
    assert sft_row["forward_kl"]["n"] == 0 and kl_row["forward_kl_sampled"]["n"] == 0
    assert "forward KL(ref ‖ θ), full vocabulary" in text and "forward KL(ref ‖ θ), sampled-token estimate" in text
    assert "two estimators" in text and "for SFT lr 0.001, which kept no reference model" in text
    assert summary["pareto_front"] == [] and "Pareto front: none" in text


def test_the_table_says_which_forward_kl_estimator_it_shows(tmp_path):
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0, 1), step_control=False)
    runs = synthetic_runs("sft", 1e-3, [2.0, 2.1], [0.3, 0.4]) + synthetic_runs(
        "minor_sft", 1e-3, [2.5, 2.4], [0.1, 0.2]
    )
    for run in runs:
        run["forward_kl_source"] = "eval_forward_kl_sampled"
    text = report.write_outputs({"runs": runs}, grid, tmp_path)
    assert "sampled-token estimate" in text and "no run kept its reference model" in text
    assert report.summarise(runs, grid)["paired"][0]["forward_kl_sampled"]["n"] == 2  # one estimator: paired
    for run in runs:
        run["forward_kl_source"] = "eval_forward_kl"
    assert "Forward KL over the whole vocabulary (`eval_forward_kl`)" in report.write_outputs(
        {"runs": runs}, grid, tmp_path
    )


@pytest.mark.parametrize("use_peft", [False, True], ids=["full fine-tuning", "LoRA"])
def test_every_method_precomputes_as_the_recipe_says(use_peft, recipe):
    """`sft_kl` precomputes its anchor as the others their log-probs: every run keeps its reference model ("auto") or
    every run releases it (true), so every run measures the forward KL with the same estimator."""
    grid = make_grid(("sft", "minor_sft", "sft_kl"), (1e-3,), (0,), step_control=False)
    comparison = compare.Comparison(
        str(recipe),
        ["--use_peft", str(use_peft).lower(), "--precompute_ref_log_probs", "auto"],
        grid,
        recipe.parent / "o",
    )
    comparison.prepare()
    precompute = {
        run.method: comparison.run_configs(run, 1e-3)[1].precompute_ref_log_probs for run in compare.plan(grid)
    }
    assert precompute == dict.fromkeys(("sft", "minor_sft", "sft_kl"), "auto")


def test_full_fine_tuning_sft_and_sft_kl_measure_with_the_same_estimator(recipe, tmp_path, monkeypatch):
    """End to end on the tiny model: every run of the comparison keeps its reference ("auto") and reports the
    full-vocabulary forward KL."""
    monkeypatch.setenv("MINORSFT_TRL_CACHE", str(tmp_path / "user_cache"))
    argv = [
        "compare", "--config", str(recipe), "--use_peft", "false", "--precompute_ref_log_probs", "auto",
        "--methods", "sft", "sft_kl", "--seeds", "0", "--learning_rates", "1e-2", "--max_steps", "1",
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {run["method"]: run["forward_kl_source"] for run in runs} == dict.fromkeys(
        ("sft", "sft_kl"), "eval_forward_kl"
    )


# ------------------------------------------------------------------ budgets against fixed coefficients


def test_budgets_and_fixed_coefficients_run_as_variants_of_the_kl_method(recipe, tmp_path):
    comparison = compare.comparison_from_args(
        [
            "--config", str(recipe), "--methods", "sft", "sft_kl", "--kl_coefs", "0.02", "0.2",
            "--target_forward_kls", "0.5", "--learning_rates", "1e-3", "--seeds", "0", "--output_dir", "o",
            "--eval_strategy", "steps", "--eval_steps", "1",
        ]
    )  # fmt: skip
    grid = comparison.grid
    assert grid.methods == ("sft", "sft_kl-kl_coef0.02", "sft_kl-kl_coef0.2", "sft_kl-budget0.5")
    assert [report.LABELS[m] for m in grid.methods[1:]] == [
        "SFT + KL, kl_coef 0.02",
        "SFT + KL, kl_coef 0.2",
        "SFT + KL, budget 0.5",
    ]
    comparison.prepare()
    budgeted = comparison.run_configs(compare.Run("sft_kl-budget0.5", 1e-3, 0), 1e-3)[1]
    assert (budgeted.loss_type, budgeted.target_forward_kl, budgeted.kl_coef) == ("sft_kl", 0.5, 0.05)
    assert budgeted.output_dir == "o/runs/sft_kl-budget0.5-lr0.001-seed0"
    fixed = comparison.run_configs(compare.Run("sft_kl-kl_coef0.2", 1e-3, 0), 1e-3)[1]
    assert (fixed.kl_coef, fixed.target_forward_kl) == (0.2, None)
    # A variant's own settings (the budgets alone evaluating during training), and a variant the grid has not
    evaluated = make_grid(
        ("sft_kl",), (1e-3,), (0,), method_settings={"sft_kl-budget0.5": {"eval_steps": 12}}, target_forward_kls=(0.5,)
    )
    assert evaluated.settings_of("sft_kl-budget0.5") == {"eval_steps": 12, "target_forward_kl": 0.5}
    assert evaluated.settings_of("sft_kl") == {}
    with pytest.raises(
        InputError, match="unknown method 'sft_kl-budget0.7': known ones are sft, .*, sft_kl-budget0.5"
    ):
        make_grid(("sft_kl",), (1e-3,), (0,), method_settings={"sft_kl-budget0.7": {}}, target_forward_kls=(0.5,))
    # Without --kl_coefs the method keeps the recipe's coefficient beside its budgets
    assert make_grid(("sft_kl",), (1e-3,), (0,), target_forward_kls=(0.25, 1)).methods == (
        "sft_kl",
        "sft_kl-budget0.25",
        "sft_kl-budget1",
    )


def budget_grid_runs():
    """SFT drifts 2.0; fixed coefficients 0.05 (KL 1.0, accuracy 60) and 0.5 (KL 0.3, accuracy 50); the budget 0.5
    ends at 0.45-0.55 with accuracy 56-58: the best fixed within it is 0.5, 7 points below, seed by seed."""
    lr = 1e-3
    runs = synthetic_runs("sft", lr, [2.0] * 3, [2.0] * 3, accuracy=[0.7, 0.7, 0.7])
    runs += synthetic_runs("sft_kl-kl_coef0.05", lr, [2.1] * 3, [1.0] * 3, accuracy=[0.6, 0.6, 0.6])
    runs += synthetic_runs("sft_kl-kl_coef0.5", lr, [2.4] * 3, [0.3] * 3, accuracy=[0.5, 0.5, 0.5])
    runs += synthetic_runs("sft_kl-budget0.5", lr, [2.2] * 3, [0.45, 0.5, 0.55], accuracy=[0.56, 0.57, 0.58])
    runs += synthetic_runs("sft_kl-budget0.1", lr, [2.6] * 3, [0.1] * 3, accuracy=[0.4, 0.4, 0.4])
    return runs


def test_each_budget_is_paired_with_the_best_fixed_coefficient_within_it(tmp_path):
    grid = make_grid(("sft", "sft_kl"), (1e-3,), (0, 1, 2), kl_coefs=(0.05, 0.5), target_forward_kls=(0.5, 0.1))
    text = report.write_outputs({"runs": budget_grid_runs()}, grid, tmp_path)
    rows = {row["budget"]: row for row in json.loads((tmp_path / "results.json").read_text())["summary"]["budgets"]}
    half = rows[0.5]
    assert half["budget_ratio"] == {"min": pytest.approx(0.9), "max": pytest.approx(1.1)}
    assert half["best_fixed"] == "sft_kl-kl_coef0.5" and half["unconstrained_forward_kl"]["mean"] == 2.0
    assert half["against_best_fixed"]["accuracy"]["mean"] == pytest.approx(7.0)
    assert half["against_best_fixed"]["forward_kl"]["mean"] == pytest.approx(0.2)
    assert "best_fixed" not in rows[0.1]  # every fixed coefficient drifted past 0.1
    assert "## Budgets steered against fixed coefficients" in text
    assert "| SFT + KL, budget 0.1 | 0.001 | none: every fixed coefficient ended over the budget |" in text


def test_a_second_task_is_scored_before_and_after_every_run(recipe, tmp_path, monkeypatch, capsys):
    from tiny import BIGBENCH_TASK

    from minorsft_trl.data import bigbench

    def questions(task, archive=None):
        assert task == "units/metres"
        return [
            {"prompt": e["input"], "choices": list(e["target_scores"]), "answer": 0, "completion": ""}
            for e in BIGBENCH_TASK["examples"][:10]
        ]

    monkeypatch.setattr(bigbench, "task_examples", questions)
    seen = []

    def measured(configs, eval_dataset, accuracy_kind, other_task=None):
        seen.append(len(other_task))
        return {**fake_measures(configs, eval_dataset, accuracy_kind), "other_task_accuracy": 0.25}

    monkeypatch.setattr(compare, "run_and_measure", measured)
    monkeypatch.setattr(compare, "base_accuracy", lambda configs, dataset: 0.5 if len(dataset) == 4 else 0.9)
    argv = compare_argv(recipe, tmp_path / "out", tmp_path / "c", "1e-3")
    argv += ["--step_control", "off", "--other_task", "bigbench:units/metres", "--other_task_questions", "4"]
    assert cli.main(argv) == 0
    assert seen == [4, 4, 4, 4]
    assert "base model: accuracy on bigbench:units/metres (no run trains on it) 50.0%" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["base"]["other_task_accuracy"] == 0.5
    assert "accuracy on a task not trained on (%)" in (tmp_path / "out" / "results.md").read_text()
