"""What a steered budget bought in a comparison (`minorsft-trl compare --target_forward_kls ...`): for each budget,
the forward KL its runs ended at against the budget, its gain, and the paired difference against the best fixed
coefficient whose forward KL kept within the same budget, at the same learning rate.

The fixed coefficients are the same method's runs with a fixed `kl_coef` (`--kl_coefs`, or the recipe's own) and
plain SFT (a coefficient of 0). "Best" is the highest seed-mean gain among those whose seed-mean forward KL is within
the budget; where none is, the row says so.
"""

from .grid import LABELS, base_method, budget_of
from .report import (
    MEASURES,
    PERCENTS,
    difference,
    gain_measure,
    groups_of,
    interval,
    interval_text,
    per_seed,
)
from .stats import t_interval

# Shown for each budget, where the runs have them
COLUMNS = ("accuracy", "answer_nll", "nll_change", "other_task_accuracy")


def budget_rows(runs: list[dict]) -> list[dict]:
    """A row per budgeted configuration (method, budget, learning rate): see the module docstring."""
    gain = gain_measure(runs)
    sign = 1 if MEASURES[gain][1] else -1
    groups = groups_of(runs)
    rows = []
    for (method, lr), group in groups.items():
        budget = budget_of(method)
        if budget is None:
            continue
        fixed = {
            name: runs_of
            for (name, rate), runs_of in groups.items()
            if rate == lr and budget_of(name) is None and (name == "sft" or base_method(name) == base_method(method))
        }
        ratios = [kl / budget for kl in per_seed(group, "forward_kl").values() if kl is not None]
        row = {
            "method": method,
            "budget": budget,
            "learning_rate": lr,
            "gain": gain,
            "forward_kl": interval(group, "forward_kl"),
            "budget_ratio": {"min": min(ratios, default=None), "max": max(ratios, default=None)},
            **{m: interval(group, m) for m in COLUMNS if any(r.get(m) is not None for r in group)},
        }
        sft = fixed.get("sft")
        if sft:
            row["unconstrained_forward_kl"] = interval(sft, "forward_kl")
        within = {name: runs_of for name, runs_of in fixed.items() if _mean(runs_of, "forward_kl") <= budget}
        if within:
            best = max(within, key=lambda name: sign * _mean(within[name], gain))
            row["best_fixed"] = best
            row["best_fixed_forward_kl"] = interval(within[best], "forward_kl")
            row["best_fixed_gain"] = interval(within[best], gain)
            row["against_best_fixed"] = {
                m: difference(group, within[best], m)
                for m in ("forward_kl", *COLUMNS)
                if m in row and any(r.get(m) is not None for r in within[best])
            }
        rows.append(row)
    return rows


def _mean(runs: list[dict], measure: str) -> float:
    """The seed-mean of a measure over a configuration's runs."""
    return t_interval(list(per_seed(runs, measure).values())).mean


def budget_section(rows: list[dict]) -> list[str]:
    """The markdown of `budget_rows`: one table of what each budget reached, one of its difference from the best
    fixed coefficient within it."""
    if not rows:
        return []
    gain = rows[0]["gain"]
    columns = [m for m in COLUMNS if any(m in row for row in rows)]
    lines = [
        "## Budgets steered against fixed coefficients",
        "",
        "Each budget's runs (`target_forward_kl`, the KL anchor's coefficient steered to it): the forward KL they "
        "ended at, its ratio to the budget (lowest and highest run), and what they reached; then the best fixed "
        "coefficient whose forward KL kept within the same budget (highest gain; plain SFT counts as a coefficient "
        "of 0), at the same learning rate.",
        "",
        "| budget | lr | forward KL | x budget (runs) | " + " | ".join(MEASURES[m][0] for m in columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        ratio = row["budget_ratio"]
        ratios = "n/a" if ratio["min"] is None else f"{ratio['min']:.2f}-{ratio['max']:.2f}"
        cells = [interval_text(row[m], m) if m in row else "" for m in columns]
        lines.append(
            f"| {LABELS[row['method']]} | {row['learning_rate']:g} | {interval_text(row['forward_kl'], 'forward_kl')} "
            f"| {ratios} | " + " | ".join(cells) + " |"
        )
    unit = " (points)" if gain in PERCENTS else ""
    lines += [
        "",
        "Against the best fixed coefficient within the budget (budget - fixed, seed by seed; accuracies with one "
        f"seed question by question){unit}:",
        "",
        "| budget | lr | best fixed within it | its forward KL | forward KL difference | "
        + " | ".join(f"{MEASURES[m][0]} difference" for m in columns)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        if "best_fixed" not in row:
            lines.append(
                f"| {LABELS[row['method']]} | {row['learning_rate']:g} | none: every fixed coefficient ended over "
                "the budget |" + " |" * (2 + len(columns))
            )
            continue
        against = row["against_best_fixed"]
        cells = [interval_text(against[m], m) if m in against else "" for m in columns]
        lines.append(
            f"| {LABELS[row['method']]} | {row['learning_rate']:g} | {LABELS[row['best_fixed']]} "
            f"| {interval_text(row['best_fixed_forward_kl'], 'forward_kl')} "
            f"| {interval_text(against['forward_kl'], 'forward_kl')} | " + " | ".join(cells) + " |"
        )
    return lines
