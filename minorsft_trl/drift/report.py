"""The method comparison's aggregates and its report: `results.md`, `results.json` and the gain-vs-drift plot.

Every measure is a mean over seeds with its 95% t interval; differences are paired by seed against SFT at the same
learning rate; drift is compared at matched gain (interpolated seed by seed between a method's learning rates, never
extrapolated); the Pareto front keeps the configurations nothing beats on gain and forward KL together. The forward KL
of a run that kept its reference model (the full-vocabulary one) and of a run that did not (the sampled-token
estimate) are two measures: never averaged, differenced or ranked together.
"""

import dataclasses
import json
import math
from pathlib import Path

from minorsft_trl.drift import verdict
from minorsft_trl.drift.grid import LABELS, STEP_CONTROL, Grid
from minorsft_trl.drift.stats import (
    Interval,
    interpolate_at,
    paired_difference,
    pareto_front,
    t_interval,
    wilson_interval,
)

MEASURES = {  # key: (title, higher is better)
    "accuracy": ("held-out accuracy (%)", True),
    "answer_nll": ("held-out answer NLL", False),
    "forward_kl": ("forward KL(ref ‖ θ), full vocabulary", False),
    "forward_kl_sampled": ("forward KL(ref ‖ θ), sampled-token estimate", False),
    "heldout_deviation": ("held-out m_theta", False),
    "nll_change": ("NLL change on held-out text", False),
    "other_task_accuracy": ("accuracy on a task not trained on (%)", True),
    "train_deviation": ("train deviation", False),
    "clipped_fraction": ("steps clipped (%)", False),
    "grad_norm_over_1": ("steps with grad norm > 1 (%)", False),
}
# Shares reported in % (their differences in percentage points); a run records them as fractions
PERCENTS = ("accuracy", "other_task_accuracy", "clipped_fraction", "grad_norm_over_1")
DRIFTS = ("forward_kl", "forward_kl_sampled", "heldout_deviation", "nll_change")
# The trainer's metric a run's forward KL came from (`forward_kl_source`) -> the measure it is reported as
KL_ESTIMATORS = {"eval_forward_kl": "forward_kl", "eval_forward_kl_sampled": "forward_kl_sampled"}
ONE_SEED = "one seed: no intervals (every number is that seed's value; give --seeds 0 1 2 for 95% intervals)."
ONE_SEED_QUESTIONS = (
    "one seed: accuracy intervals are over the held-out questions (differences paired by question), which leave out "
    "how much another seed would move a run; the other measures are that seed's values (give --seeds 0 1 2 for 95% "
    "intervals over seeds)."
)
COLOURS = {
    "sft": "tab:grey", "minor_sft": "tab:blue", "sft_dpo": "tab:orange", "asft": "tab:green",
    "sft_kl": "tab:olive", "iw_sft": "tab:red", STEP_CONTROL: "black",
}  # fmt: skip


def by_estimator(run: dict) -> dict:
    """The run with its forward KL under the measure of the estimator that gave it: a run that kept no reference
    model (`eval_forward_kl_sampled`) has `forward_kl_sampled` and no `forward_kl`."""
    if KL_ESTIMATORS.get(run.get("forward_kl_source"), "forward_kl") == "forward_kl":
        return run
    return {**run, "forward_kl": None, "forward_kl_sampled": run.get("forward_kl")}


def kl_measures(measures: list[str]) -> list[str]:
    """The forward KL measures (estimators) among `measures`."""
    return [m for m in measures if m in KL_ESTIMATORS.values()]


def gain_measure(runs: list[dict]) -> str:
    """`accuracy` when every run has a task accuracy, else the held-out answer NLL (lower is better)."""
    return "accuracy" if runs and all(r.get("accuracy") is not None for r in runs) else "answer_nll"


def present(runs: list[dict]) -> list[str]:
    """The measures some run has a value of."""
    return [m for m in MEASURES if any(r.get(m) is not None for r in runs)]


def per_seed(runs: list[dict], measure: str) -> dict[int, float | None]:
    """The measure of each run by its seed, shares in %."""
    scale = 100 if measure in PERCENTS else 1
    return {r["seed"]: None if r.get(measure) is None else r[measure] * scale for r in runs}


def intervals_over_questions(runs: list[dict]) -> bool:
    """Whether the runs scored a task question by question: then one seed still gives accuracy intervals."""
    return any(r.get("accuracy_outcomes") for r in runs)


# The per-question outcomes a run keeps of each accuracy
OUTCOMES = {"accuracy": "accuracy_outcomes", "other_task_accuracy": "other_task_outcomes"}


def question_outcomes(group: list[dict], measure: str) -> list[int] | None:
    """The per-question outcomes of a configuration run on one seed (intervals over the questions), else None
    (intervals over seeds)."""
    if measure in OUTCOMES and len(group) == 1:
        return group[0].get(OUTCOMES[measure])
    return None


def interval(group: list[dict], measure: str) -> dict:
    """A configuration's mean with its 95% interval: over seeds, or with one seed (accuracy) over the questions
    (Wilson's)."""
    outcomes = question_outcomes(group, measure)
    if outcomes:
        share = wilson_interval(outcomes)
        return Interval(100 * share.mean, 100 * share.low, 100 * share.high, share.n).to_dict()
    return t_interval(list(per_seed(group, measure).values())).to_dict()


def difference(group: list[dict], baseline: list[dict], measure: str) -> dict:
    """`group - baseline`: paired by seed, or with one seed each (the same one; accuracy) paired by question."""
    outcomes, base_outcomes = question_outcomes(group, measure), question_outcomes(baseline, measure)
    if outcomes and base_outcomes and group[0]["seed"] == baseline[0]["seed"]:
        return t_interval([100.0 * (a - b) for a, b in zip(outcomes, base_outcomes, strict=True)]).to_dict()
    return paired_difference(per_seed(group, measure), per_seed(baseline, measure)).to_dict()


def groups_of(runs: list[dict]) -> dict[tuple[str, float], list[dict]]:
    """The runs grouped by (method, grid learning rate), in the order they ran."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["learning_rate"]), []).append(run)
    return groups


def summarise(runs: list[dict], grid: Grid) -> dict:
    """Every measure of every configuration with its interval; paired differences against SFT at the same learning
    rate; drift at matched gain; the Pareto front (gain up, forward KL down); the step-size control. Each forward KL
    estimator is its own measure (`by_estimator`): a difference between runs of two estimators is n/a, and the
    Pareto front needs a single one."""
    runs = [by_estimator(run) for run in runs]
    measures = present(runs)
    gain = gain_measure(runs)
    higher_is_better = MEASURES[gain][1]
    groups = groups_of(runs)
    summary = {
        "gain": gain,
        "measures": measures,
        "configurations": [],
        "paired": [],
        "matched": [],
        "best": [],
        "control": [],
    }
    for (method, lr), group in groups.items():
        entry = {"method": method, "learning_rate": lr, "trained_lr": sum(r["trained_lr"] for r in group) / len(group)}
        entry.update({m: interval(group, m) for m in measures})
        if method == "minor_sft":
            entry["mean_minor_weight"] = t_interval([r.get("mean_minor_weight") for r in group]).to_dict()
        summary["configurations"].append(entry)
        baseline = groups.get(("sft", lr))
        if method not in ("sft", STEP_CONTROL) and baseline:  # the control has its own comparison, below
            summary["paired"].append(
                {
                    "method": method,
                    "learning_rate": lr,
                    **{m: difference(group, baseline, m) for m in measures},
                }
            )
    estimators = kl_measures(measures)
    front_kl = summary["pareto_kl"] = estimators[0] if len(estimators) == 1 else None
    ranked = [
        c for c in summary["configurations"] if front_kl and _finite(c[gain]["mean"]) and _finite(c[front_kl]["mean"])
    ]
    points = [((1 if higher_is_better else -1) * c[gain]["mean"], c[front_kl]["mean"]) for c in ranked]
    summary["pareto_front"] = [(ranked[i]["method"], ranked[i]["trained_lr"]) for i in pareto_front(points)]
    if len(grid.learning_rates) > 1:
        drifts = [d for d in DRIFTS if d in measures]
        summary["matched"] = matched_gain(groups, grid, gain, drifts)
        summary["best"] = at_best_learning_rate(summary["configurations"], groups, gain, measures)
    from minorsft_trl.drift.budget_report import budget_rows  # it reads this module's measures

    summary["budgets"] = budget_rows(runs)
    for lr in grid.step_control:
        control, minor = groups.get((STEP_CONTROL, lr)), groups.get(("minor_sft", lr))
        if control and minor:
            summary["control"].append(
                {
                    "learning_rate": lr,
                    "trained_lr": control[0]["trained_lr"],
                    **{m: difference(minor, control, m) for m in measures},
                }
            )
    return summary


def matched_gain(groups: dict, grid: Grid, gain: str, drifts: list[str]) -> list[dict]:
    """Each method's drift at one gain every method reached: the middle of the overlap of their (seed-mean) gain
    ranges over learning rates, interpolated seed by seed between the method's learning rates, where the smallest
    rate that reaches it does. The overlap and the interpolation do not depend on which direction of the gain is
    better. A seed whose learning rates do not bracket the target has no value there: each row counts the seeds it
    rests on (`seeds_reaching`, out of `seeds`), and keeps each seed's value (`by_seed`) to pair methods on."""
    methods = [m for m in grid.methods if all((m, lr) in groups for lr in grid.learning_rates)]
    if not methods:
        return []
    ranges = {}
    for method in methods:
        means = [t_interval(list(per_seed(groups[(method, lr)], gain).values())).mean for lr in grid.learning_rates]
        ranges[method] = (min(means), max(means))
    low, high = max(r[0] for r in ranges.values()), min(r[1] for r in ranges.values())
    if not (low <= high):  # also when a mean is NaN
        return [{"target": None, "gain": gain, "note": "the methods' gain ranges do not overlap"}]
    target = (low + high) / 2
    rows = []
    for method in methods:
        seeds = sorted({r["seed"] for lr in grid.learning_rates for r in groups[(method, lr)]})
        row = {"method": method, "target": target, "gain": gain, "seeds": len(seeds), "by_seed": {}}
        for drift in drifts:
            values = []
            for seed in seeds:
                seed_points = [
                    (per_seed([r], gain)[seed], r[drift])
                    for lr in sorted(grid.learning_rates)
                    for r in groups[(method, lr)]
                    if r["seed"] == seed and r.get(gain) is not None and r.get(drift) is not None
                ]
                values.append(interpolate_at(seed_points, target))
            row[drift] = t_interval(values).to_dict()
            row["by_seed"][drift] = dict(zip(seeds, values, strict=True))
        # The seeds whose learning rates bracket the target, on the measure they have (one forward KL estimator)
        row["seeds_reaching"] = max((row[drift]["n"] for drift in drifts), default=0)
        rows.append(row)
    return rows


def at_best_learning_rate(configurations: list[dict], groups: dict, gain: str, measures: list[str]) -> list[dict]:
    """Each method's configuration at the learning rate of its best seed-mean gain (of equal ones, the smallest), as
    the paper compares methods, with its difference, seed by seed, from SFT at SFT's best learning rate. `interior`
    says whether the best rate has a rate of the method on either side: at an edge, a better one may lie beyond."""
    sign = 1 if MEASURES[gain][1] else -1
    best = {}
    for method in dict.fromkeys(c["method"] for c in configurations if c["method"] != STEP_CONTROL):
        own = [c for c in configurations if c["method"] == method]
        finite = [c for c in own if _finite(c[gain]["mean"])]
        if finite:
            # A tie goes to the smaller rate: the same gain for less of a step (on a plateau, where drift is least)
            top = max(finite, key=lambda c: (sign * c[gain]["mean"], -c["learning_rate"]))
            rates = [c["learning_rate"] for c in own]
            best[method] = {**top, "interior": min(rates) < top["learning_rate"] < max(rates)}
    for method, row in best.items():
        if method != "sft" and "sft" in best:
            baseline = groups[("sft", best["sft"]["learning_rate"])]
            group = groups[(method, row["learning_rate"])]
            row["against_sft"] = {m: difference(group, baseline, m) for m in measures}
    return list(best.values())


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


# ------------------------------------------------------------------ markdown


def interval_text(interval: dict, measure: str = "") -> str:
    # A forward KL of 0.001 nats/token is already drift; a share of steps needs no decimals
    digits = {"accuracy": 1, "other_task_accuracy": 1, "forward_kl": 4, "clipped_fraction": 0, "grad_norm_over_1": 0}
    digits = digits.get(measure, 3)
    return Interval(**interval).format(digits=digits)


def label(method: str, trained_lr: float) -> str:
    """A configuration, named once by the learning rate it trained at (the control's is the computed one)."""
    return f"{LABELS[method]} lr {trained_lr:.3g}"


def best_label(row: dict) -> tuple[str, float, dict]:
    """A row of the best-learning-rate table: the method, starred when its best rate is at the grid's edge."""
    return (LABELS[row["method"]] + ("" if row["interior"] else " *"), row["learning_rate"], row)


def measures_table(rows: list[tuple[str, float, dict]], measures: list[str]) -> list[str]:
    """A markdown table, one row per `(label, learning rate, intervals by measure)`, a column per measure."""
    lines = ["| method | lr | " + " | ".join(MEASURES[m][0] for m in measures) + " |"]
    lines.append("|---|---|" + "---|" * len(measures))
    for name, learning_rate, intervals in rows:
        cells = [interval_text(intervals[m], m) for m in measures]
        lines.append(f"| {name} | {learning_rate:.3g} | " + " | ".join(cells) + " |")
    return lines


def matched_table(rows: list[dict]) -> list[str]:
    """The drift at matched gain, a row per method, with the seeds each interval rests on."""
    drifts = [d for d in DRIFTS if d in rows[0]]
    lines = [
        "| method | seeds reaching it | " + " | ".join(MEASURES[d][0] for d in drifts) + " |",
        "|---|---|" + "---|" * len(drifts),
    ]
    for row in rows:
        cells = [f"{row['seeds_reaching']} of {row['seeds']}"] + [interval_text(row[d], d) for d in drifts]
        lines.append(f"| {LABELS[row['method']]} | " + " | ".join(cells) + " |")
    return lines


def estimator_note(runs: list[dict]) -> str:
    """Which estimator the forward KL of the tables is: the full-vocabulary one, the sampled-token estimate, or both
    (each its own column, the configurations of the sampled one named, nothing taken across them)."""
    sampled = [r for r in runs if by_estimator(r)["forward_kl"] is None]
    if not sampled:
        return "Forward KL over the whole vocabulary (`eval_forward_kl`): every run kept its reference model."
    if len(sampled) == len(runs):
        return (
            "Forward KL as its sampled-token estimate, mean_t (log π_ref(y_t) - log π_θ(y_t)) "
            "(`eval_forward_kl_sampled`: no run kept its reference model), unbiased and noisier than the "
            "full-vocabulary one."
        )
    configurations = "; ".join(dict.fromkeys(label(r["method"], r["trained_lr"]) for r in sampled))
    return (
        "Forward KL from two estimators, each its own column: the sampled-token estimate (`eval_forward_kl_sampled`) "
        f"for {configurations}, which kept no reference model, and the full-vocabulary one for the others. No "
        "difference, matched gain or Pareto front is taken across them: set `precompute_ref_log_probs: false` for "
        "every run so that every run keeps its reference."
    )


def markdown(results: dict, summary: dict, grid: Grid, recipe: str = "", overrides=(), wall_seconds=None) -> str:
    measures, gain = summary["measures"], summary["gain"]
    one_seed = len(grid.seeds) == 1
    runs = results["runs"]
    lines = ["# Method comparison", ""]
    if recipe:
        lines += [f"Recipe `{recipe}`" + (f" with `{' '.join(overrides)}`" if overrides else "") + ".", ""]
    lines += [
        f"Methods {', '.join(grid.methods)}; learning rates {', '.join(f'{lr:g}' for lr in grid.learning_rates)}; "
        f"seeds {list(grid.seeds)}."
        + (
            f" Step-size control at Minor SFT's lr {', '.join(f'{lr:g}' for lr in grid.step_control)}."
            if grid.step_control
            else ""
        ),
        "",
        (ONE_SEED_QUESTIONS if intervals_over_questions(runs) else ONE_SEED)
        if one_seed
        else "Every cell: mean over seeds [95% t interval].",
        "",
        "Gain: "
        + (
            "held-out task accuracy in % (higher is better)."
            if gain == "accuracy"
            else "held-out answer NLL, the mean per-token NLL of the held-out answers (lower is better)."
        )
        + " Drift: forward KL(π_ref ‖ π_θ) per token on reference samples; held-out m_theta (log-ratio per answer "
        "token on held-out answers); NLL change on held-out text (when the recipe sets `drift_text_dataset`).",
        "",
        estimator_note(runs),
    ]
    if results.get("base", {}).get("accuracy") is not None:
        lines += ["", f"Base model: held-out accuracy {100 * results['base']['accuracy']:.1f}%."]
    lines += [""]
    lines += measures_table([(LABELS[c["method"]], c["trained_lr"], c) for c in summary["configurations"]], measures)
    if summary["paired"]:
        lines += [
            "",
            f"Paired differences against SFT at the same learning rate (method - SFT, seed by seed"
            f"{'; lower gain NLL is better' if gain == 'answer_nll' else ''}):",
            "",
        ]
        lines += measures_table([(LABELS[p["method"]], p["learning_rate"], p) for p in summary["paired"]], measures)
    if summary["best"]:
        lines += ["", "Each method at its best learning rate (best seed-mean gain; * = at the edge of the grid):", ""]
        lines += measures_table([best_label(b) for b in summary["best"]], measures)
        against = [b for b in summary["best"] if "against_sft" in b]
        if against:
            sft = next(b for b in summary["best"] if b["method"] == "sft")
            lines += [
                "",
                f"Each at its best minus SFT at its best (lr {sft['learning_rate']:g}), seed by seed:",
                "",
            ]
            lines += measures_table([(*best_label(b)[:2], b["against_sft"]) for b in against], measures)
    if summary["matched"]:
        target = summary["matched"][0]["target"]
        if target is None:
            lines += ["", "Matched gain: " + summary["matched"][0]["note"] + "."]
        else:
            what = f"held-out accuracy {target:.1f}%" if gain == "accuracy" else f"held-out answer NLL {target:.3f}"
            lines += [
                "",
                f"Drift at matched {what} (interpolated seed by seed between learning rates; a seed whose learning "
                "rates do not bracket it is left out, and counted):",
                "",
            ]
            lines += matched_table(summary["matched"])
    if summary.get("budgets"):
        from minorsft_trl.drift.budget_report import budget_section

        lines += ["", *budget_section(summary["budgets"])]
    for control in summary["control"]:
        lines += [
            "",
            f"Step-size control: Minor SFT minus plain SFT at Minor SFT's learning rate {control['learning_rate']:g} "
            f"times its mean weight (lr {control['trained_lr']:.3g}; same seeds):",
            "",
            "| " + " | ".join(MEASURES[m][0] for m in measures) + " |",
            "|" + "---|" * len(measures),
            "| " + " | ".join(interval_text(control[m], m) for m in measures) + " |",
        ]
    front = ", ".join(label(method, lr) for method, lr in summary["pareto_front"])
    direction = "up" if MEASURES[gain][1] else "(NLL) down"
    if summary["pareto_kl"] is None and len(kl_measures(measures)) > 1:
        lines += [
            "",
            "Pareto front: none, the runs' forward KL comes from two estimators, which are not ranked together.",
        ]
    else:
        lines += ["", f"Pareto front (gain {direction}, forward KL down): {front or 'none'}."]
    if wall_seconds is not None:
        lines += ["", wall_time(runs, wall_seconds)]
    lines += ["", *verdict.section(summary, grid, results.get("base", {}).get("accuracy"))]
    return "\n".join(lines) + "\n"


def wall_time(runs: list[dict], wall_seconds: float) -> str:
    """The runs' own wall time, as they took when they were trained (read from the cache for the runs trained by an
    earlier call), and this call's."""
    trained = sum(r.get("wall_seconds") or 0 for r in runs)
    cached = [r for r in runs if r.get("from_cache")]
    if not cached:
        where = ""
    elif len(cached) == len(runs):
        where = " (trained earlier, read from the cache)"
    else:
        earlier = sum(r.get("wall_seconds") or 0 for r in cached)
        where = (
            f" ({len(cached)} of the {len(runs)} runs, {earlier / 60:.1f} min of it, trained earlier and read from "
            "the cache)"
        )
    return f"Wall time of the runs: {trained / 60:.1f} min{where}; of this call: {wall_seconds / 60:.1f} min."


# ------------------------------------------------------------------ plot and files


def pyplot():
    """matplotlib's pyplot drawing to files (the Agg backend), or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> Path | None:
    """Write `figure` to `path` and release it; None for no figure."""
    if figure is None:
        return None
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def plot(summary: dict, path: Path, title: str = "") -> Path | None:
    """The gain-vs-drift figure saved to `path`; None when matplotlib is not installed."""
    return save(gain_vs_drift_figure(summary, title), path)


def gain_vs_drift_figure(summary: dict, title: str = ""):
    """Gain against each drift measure, a point per configuration (a method's points are its learning rates), with
    95% interval bars when there are several seeds. None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    gain = summary["gain"]
    drifts = [d for d in DRIFTS if d in summary["measures"]]
    figure, axes = plt.subplots(1, len(drifts), figsize=(5 * len(drifts), 4.2), sharey=True, squeeze=False)
    for axis, drift in zip(axes[0], drifts, strict=True):
        for method in dict.fromkeys(c["method"] for c in summary["configurations"]):
            points = sorted(
                (c for c in summary["configurations"] if c["method"] == method), key=lambda c: c["learning_rate"]
            )

            def errors(key, cs=points):
                return [
                    [max(c[key]["mean"] - c[key]["low"], 0) if c[key]["n"] > 1 else 0 for c in cs],
                    [max(c[key]["high"] - c[key]["mean"], 0) if c[key]["n"] > 1 else 0 for c in cs],
                ]

            axis.errorbar(
                [c[drift]["mean"] for c in points], [c[gain]["mean"] for c in points],
                xerr=errors(drift), yerr=errors(gain), marker="o", capsize=3,
                color=COLOURS.get(method), label=LABELS[method],
            )  # fmt: skip
        axis.set(xlabel=MEASURES[drift][0])
        # 3 to 6 ticks at round steps: matplotlib's default fits up to 10 on a 5-inch panel, whose labels run into
        # each other on a narrow range of small values (0.00315, 0.00320, ...)
        axis.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(MEASURES[gain][0] + ("" if MEASURES[gain][1] else " (lower is better)"))
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(title or "mean over seeds, 95% intervals; a method's points are its learning rates")
    figure.tight_layout()
    return figure


CURVES = {"loss": "train loss", "grad_norm": "gradient norm (before clipping)", "minor_weight": "mean minor weight"}


def plot_curves(runs: list[dict], path: Path, max_grad_norm: float | None = None) -> Path | None:
    """The training-curves figure saved to `path`; None without matplotlib or curves."""
    return save(curves_figure(runs, max_grad_norm), path)


def curves_figure(runs: list[dict], max_grad_norm: float | None = None):
    """The training curves of every configuration over the steps, a line per (method, learning rate) from its first
    seed: the loss, the gradient norm (with the clipping bound) and Minor SFT's mean weight, the panels the runs
    logged. Shows where over a long run the brake acts and how often clipping binds. None without matplotlib or
    curves."""
    panels = [key for key in CURVES if any(key in point for r in runs for point in r.get("curve") or [])]
    plt = pyplot()
    if plt is None or not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    first = {}
    for run in runs:
        first.setdefault((run["method"], run["learning_rate"]), run)
    widths = {lr: 0.8 + 0.6 * rank for rank, lr in enumerate(sorted({lr for _, lr in first}))}
    for axis, key in zip(axes[0], panels, strict=True):
        for (method, lr), run in first.items():
            points = [point for point in run.get("curve") or [] if key in point]
            if points:
                axis.plot(
                    [point["step"] for point in points], [point[key] for point in points], linewidth=widths[lr],
                    color=COLOURS.get(method), alpha=0.8, label=label(method, run["trained_lr"]),
                )  # fmt: skip
        if key == "grad_norm":
            axis.set_yscale("log")
            if max_grad_norm:
                axis.axhline(max_grad_norm, color="red", linestyle="--", linewidth=0.8, label="clipping bound")
        axis.set(xlabel="step", title=CURVES[key])
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)  # the loss panel draws every configuration
    figure.tight_layout()
    return figure


def plot_name(summary: dict) -> str:
    return "accuracy_vs_drift.png" if summary["gain"] == "accuracy" else "gain_vs_drift.png"


def _json_safe(value):
    """NaN (the interval of one seed) as null: results.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(
    results: dict,
    grid: Grid,
    output_dir: Path,
    recipe: str = "",
    overrides=(),
    wall_seconds=None,
    title: str = "",
    max_grad_norm: float | None = None,
) -> str:
    """`results.md`, `results.json` and the plot in `output_dir`; returns the markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(results["runs"], grid)
    text = markdown(results, summary, grid, recipe, overrides, wall_seconds)
    (output_dir / "results.md").write_text(text)
    payload = {
        "recipe": recipe,
        "overrides": list(overrides),
        "grid": dataclasses.asdict(grid),
        "base": results.get("base", {}),
        "runs": results["runs"],
        "summary": summary,
        "wall_seconds_of_runs": sum(r.get("wall_seconds") or 0 for r in results["runs"]),
        "wall_seconds_of_this_call": wall_seconds,
    }
    (output_dir / "results.json").write_text(json.dumps(_json_safe(payload), indent=1))
    if not title and len(grid.seeds) == 1:
        questions = intervals_over_questions(results["runs"])
        intervals = "accuracy with its 95% interval over the held-out questions" if questions else "no intervals"
        title = f"one seed: {intervals}; a method's points are its learning rates"
    plot(summary, output_dir / plot_name(summary), title)
    plot_curves(results["runs"], output_dir / "training_curves.png", max_grad_norm)
    return text


def write(results: dict, comparison, wall_seconds: float) -> str:
    """The outputs of a `Comparison` run."""
    return write_outputs(
        results,
        comparison.grid,
        comparison.output_dir,
        comparison.config,
        comparison.overrides,
        wall_seconds,
        max_grad_norm=comparison.base[1].max_grad_norm,
    )
