"""What a drift budget means in forgetting: across comparison runs, the NLL change on general text and the accuracy
lost on a task no run trained on (`compare --other_task`), against the forward KL each run ended at ("RL's Razor",
arXiv 2509.04259, found the forward KL predicts forgetting).

Each is fitted by least squares through the origin (a run that has not moved, forward KL 0, has forgotten nothing),
over the runs that ended at most twice the largest budget away from their reference (the relation is steeper far out:
runs at 5-10 nats/token, which no budget allows, would set the slope), with the fit's R^2 about 0 and the spread of
the runs about it; the cost of a budget is read two ways: from the fit at the budget, and from the runs that ended
near it (within `NEAR` of it, relatively).
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .stats import t_interval, t_quantile

# A run "ended near" a budget when its forward KL is within this fraction of it
NEAR = 0.2
MEASURES = {
    "nll_change": "NLL change on general text (nats/token)",
    "accuracy_lost": "accuracy lost on a task not trained on (points)",
}


@dataclass(frozen=True)
class Point:
    """One run: where it came from, its method, the forward KL it ended at, and its forgetting measures."""

    source: str
    method: str
    forward_kl: float
    nll_change: float | None
    accuracy_lost: float | None


def points_of(results_files: list[Path]) -> list[Point]:
    """The runs of `minorsft-trl compare` results files whose forward KL is the full-vocabulary one (the sampled-token
    estimate is another measure, not pooled with it), each once: blocks of one recipe share runs through the cache,
    and a run in two results files (the same method and the same measured values) counts once, under the first."""
    points = []
    root = os.path.commonpath([Path(path).parent for path in results_files]) if len(results_files) > 1 else None
    for path in results_files:
        results = json.loads(Path(path).read_text())
        base = results.get("base", {}).get("other_task_accuracy")
        for run in results["runs"]:
            if run.get("forward_kl_source") != "eval_forward_kl" or run.get("forward_kl") is None:
                continue
            other = run.get("other_task_accuracy")
            lost = 100 * (base - other) if base is not None and other is not None else None
            source = os.path.relpath(Path(path).parent, root) if root else Path(path).parent.name
            point = Point(source, run["method"], run["forward_kl"], run.get("nll_change"), lost)
            if all((p.method, p.forward_kl, p.nll_change) != (point.method, point.forward_kl, point.nll_change)
                   for p in points):  # fmt: skip
                points.append(point)
    return points


@dataclass(frozen=True)
class Fit:
    """`y = slope * forward KL`, over `n` runs: the slope's 95% interval, R^2 about 0, the runs' spread about the
    line (their residuals' standard deviation)."""

    measure: str
    slope: float
    low: float
    high: float
    r_squared: float
    spread: float
    n: int


def fit_through_origin(points: list[Point], measure: str) -> Fit | None:
    """The least-squares line through the origin of `measure` against the forward KL; None under 3 runs."""
    pairs = [(p.forward_kl, getattr(p, measure)) for p in points if getattr(p, measure) is not None]
    if len(pairs) < 3:
        return None
    sxx = sum(x * x for x, _ in pairs)
    slope = sum(x * y for x, y in pairs) / sxx
    residuals = [y - slope * x for x, y in pairs]
    sse = sum(r * r for r in residuals)
    variance = sse / (len(pairs) - 1)
    half = t_quantile(len(pairs) - 1) * math.sqrt(variance / sxx)
    total = sum(y * y for _, y in pairs)
    r_squared = 1 - sse / total if total else math.nan
    return Fit(measure, slope, slope - half, slope + half, r_squared, math.sqrt(variance), len(pairs))


def budget_costs(points: list[Point], fits: dict[str, Fit], budgets: tuple[float, ...]) -> list[dict]:
    """For each budget: each measure from the fit at the budget, and the mean [95% t interval] of the runs that
    ended near it."""
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        near = [p for p in points if abs(p.forward_kl - budget) <= NEAR * budget]
        for measure, fit in fits.items():
            values = [getattr(p, measure) for p in near if getattr(p, measure) is not None]
            row[measure] = {
                "fit": fit.slope * budget,
                "fit_low": fit.low * budget,
                "fit_high": fit.high * budget,
                "near": t_interval(values).to_dict(),
            }
        rows.append(row)
    return rows


def fitted_range(points: list[Point], budgets: tuple[float, ...]) -> list[Point]:
    """The runs the fits rest on: those that ended within twice the largest budget."""
    return [p for p in points if p.forward_kl <= 2 * max(budgets)]


def report(points: list[Point], budgets: tuple[float, ...]) -> tuple[str, dict]:
    """The markdown and the JSON payload: the fits and what each budget has cost."""
    fitted = fitted_range(points, budgets)
    fits = {m: fit for m in MEASURES if (fit := fit_through_origin(fitted, m)) is not None}
    costs = budget_costs(points, fits, budgets)
    lines = [
        "# Forgetting against the forward KL",
        "",
        f"{len(points)} runs of this project's comparisons ({', '.join(sorted({p.source for p in points}))}), each "
        "at the forward KL from its reference it ended at (full vocabulary, on the reference's samples). Fitted "
        f"through the origin by least squares on the {len(fitted)} runs that ended at most {2 * max(budgets):g} "
        "nats/token away (twice the largest budget); R^2 about 0; spread: the runs' standard deviation about the "
        "line.",
        "",
        "| measure | runs | per nat/token of forward KL [95%] | R^2 | spread |",
        "|---|---|---|---|---|",
    ]
    for fit in fits.values():
        lines.append(
            f"| {MEASURES[fit.measure]} | {fit.n} | {fit.slope:.3g} [{fit.low:.3g}, {fit.high:.3g}] "
            f"| {fit.r_squared:.2f} | {fit.spread:.3g} |"
        )
    lines += [
        "",
        f"What a budget has cost on these runs: the fit at the budget [95% of the slope], and the runs that ended "
        f"within {NEAR:.0%} of it (mean [95% t interval], runs):",
        "",
        "| budget (nats/token) | " + " | ".join(f"{MEASURES[m]}: fit | runs near it" for m in fits) + " |",
        "|---|" + "---|---|" * len(fits),
    ]
    for row in costs:
        cells = []
        for measure in fits:
            cost = row[measure]
            near = cost["near"]
            near_text = "no run"
            if near["n"] == 1:
                near_text = f"{near['mean']:.3g}, 1 run"
            elif near["n"] > 1:
                near_text = f"{near['mean']:.3g} [{near['low']:.3g}, {near['high']:.3g}], {near['n']} runs"
            cells.append(f"{cost['fit']:.3g} [{cost['fit_low']:.3g}, {cost['fit_high']:.3g}] | {near_text}")
        lines.append(f"| {row['budget']:g} | " + " | ".join(cells) + " |")
    payload = {
        "points": [p.__dict__ for p in points],
        "fits": {m: fit.__dict__ for m, fit in fits.items()},
        "budgets": costs,
    }
    return "\n".join(lines) + "\n", payload


def figure(points: list[Point], budgets: tuple[float, ...]):
    """A panel per measure: the runs (a colour per comparison), the fit and the budgets. None without matplotlib."""
    from .report import pyplot

    plt = pyplot()
    measures = [m for m in MEASURES if any(getattr(p, m) is not None for p in points)]
    if plt is None or not measures:
        return None
    sources = sorted({p.source for p in points})
    figure, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4.2), squeeze=False)
    for axis, measure in zip(axes[0], measures, strict=True):
        for source in sources:
            own = [p for p in points if p.source == source and getattr(p, measure) is not None]
            if own:
                axis.scatter([p.forward_kl for p in own], [getattr(p, measure) for p in own], s=14, label=source)
        fit = fit_through_origin(fitted_range(points, budgets), measure)
        if fit is not None:
            top = 2 * max(budgets)
            label = f"fit, R^2 {fit.r_squared:.2f}"
            axis.plot([0, top], [0, fit.slope * top], color="black", linewidth=1, label=label)
        for budget in budgets:
            axis.axvline(budget, color="grey", linestyle=":", linewidth=0.8)
        shown = 3 * max(budgets)
        beyond = sum(p.forward_kl > shown for p in points if getattr(p, measure) is not None)
        axis.set_xlim(0, shown)
        values = [getattr(p, measure) for p in points if getattr(p, measure) is not None and p.forward_kl <= shown]
        if values:
            pad = 0.1 * (max(values) - min(min(values), 0) or 1)
            axis.set_ylim(min(min(values), 0) - pad, max(values) + pad)
        axis.set_title(f"{beyond} runs beyond {shown:g} nats/token not shown" if beyond else "", fontsize=8)
        axis.set(xlabel="forward KL(ref ‖ θ) at the end (nats/token)", ylabel=MEASURES[measure])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    return figure
