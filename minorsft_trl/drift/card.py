"""The drift a run reached: a section of its model card, and the block the training script ends the console with."""

import os

from .budget import DriftBudgetCallback, measured_forward_kl
from .steering import COEF_KEY, KLCoefController

MEASURES = {
    "eval_forward_kl": "forward KL(π_ref ‖ π_θ) per token, on reference samples",
    "eval_forward_kl_sampled": "forward KL per token on reference samples (sampled-token estimate)",
    "eval_nll_change": "NLL change per token on general text",
    "eval_deviation": "m_theta on the eval answers (paper eq. 8)",
    "eval_answer_nll": "NLL per token of the eval answers",
}


def drift_section(
    log_history: list[dict], budget: DriftBudgetCallback | None = None, steering: KLCoefController | None = None
) -> str | None:
    """A markdown section with the drift measures of every evaluation (a row per step), the budget's verdict, and
    the steered coefficient's path; `None` if the run logged none."""
    rows = [log for log in log_history if measured_forward_kl(log)[1] is not None]
    if not rows:
        return None
    columns = [key for key in MEASURES if any(key in log for log in rows)]
    lines = [
        "## Drift from the reference",
        "",
        "Measured at every evaluation and before the first step (minorsft_trl; 0 means the model is its reference):",
        "",
        "| step | " + " | ".join(MEASURES[key] for key in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for log in rows:
        cells = [f"{log[key]:.4g}" if key in log else "" for key in columns]
        lines.append(f"| {log['step']} | " + " | ".join(cells) + " |")
    if budget is not None:
        lines.append("")
        if budget.exceeded is None:
            lines.append(f"Drift budget `max_forward_kl={budget.max_forward_kl:g}`: never exceeded.")
        else:
            step, value = budget.exceeded
            kept = f"{os.path.basename(budget.within_budget_checkpoint)}, step {budget.within_budget_step}"
            result = (
                f"the starting model ({kept})"
                if budget.within_budget_step == 0
                else f"the last checkpoint within budget ({kept})"
            )
            lines.append(
                f"Drift budget `max_forward_kl={budget.max_forward_kl:g}`: exceeded at step {step} ({value:.4g}); "
                f"training stopped there, and these weights are those of {result}."
            )
    if steering is not None:
        lines += ["", steering_summary(log_history, steering)]
    return "\n".join(lines) + "\n"


def steering_summary(log_history: list[dict], steering: KLCoefController) -> str:
    """The steered budget in a sentence or two: the target, the forward KL the run ended at, the coefficient's path."""
    rows = [log for log in log_history if measured_forward_kl(log)[1] is not None]
    name, final = measured_forward_kl(rows[-1]) if rows else (None, None)
    path = [(log["step"], log[COEF_KEY]) for log in log_history if COEF_KEY in log and "loss" in log]
    ended = "" if final is None else f" ended at {name}={final:.4g} ({final / steering.target:.2f} x the budget)"
    text = f"Drift budget `target_forward_kl={steering.target:g}` steered the KL anchor's coefficient: the run{ended}"
    if path:
        coefs = [coef for _, coef in path]
        text += (
            f"; `kl_coef` started at {steering.start:g}, ranged {min(coefs):.3g}-{max(coefs):.3g} and ended at "
            f"{coefs[-1]:.3g} (step {path[-1][0]})"
        )
    text += "."
    if steering.at_ceiling_over_budget is not None:
        step, value = steering.at_ceiling_over_budget
        text += (
            f" At step {step} the run was over budget ({value:.4g}) with the coefficient at its ceiling: a lower "
            "learning rate would have kept it within."
        )
    return text


# How to read the forward KL: what this project's comparisons measured (README, "Is my run drifting?")
FORWARD_KL_SCALE = (
    "in this project's comparisons, learning a task moved it to {learned}; at {lost} the model no longer answered "
    "its task"
)
KL_LEARNED, KL_LOST = "0.04-1.9", "about 10"


def console_summary(log_history: list[dict]) -> str | None:
    """The drift at the first and the last measurement, with how to read each measure, in a few short lines; `None`
    if the run measured none."""
    rows = [log for log in log_history if measured_forward_kl(log)[1] is not None]
    if not rows:
        return None
    first, last = rows[0], rows[-1]
    name, kl = measured_forward_kl(last)
    estimate = " (sampled-token estimate)" if name.endswith("_sampled") else ""
    scale = FORWARD_KL_SCALE.format(learned=KL_LEARNED, lost=KL_LOST)
    lines = [
        f'Drift from the reference, step {first["step"]} -> step {last["step"]} (README, "Is my run drifting?"):',
        f"  forward KL on the reference's samples{estimate}: {_value(first, name)} -> {kl:.4g} nats/token ({scale})",
    ]
    if "eval_nll_change" in last:
        change = last["eval_nll_change"]
        reading = (
            "the general text got easier for the model than for its reference: the task's wording can do that, it is "
            "not forgetting"
            if change < 0
            else "how much harder the general text got: forgetting"
        )
        start = _value(first, "eval_nll_change")
        lines.append(f"  NLL change on general text: {start} -> {change:+.4g} nats/token ({reading})")
    if "eval_answer_nll" in last:
        lines.append(
            f"  held-out answer NLL: {_value(first, 'eval_answer_nll')} -> {last['eval_answer_nll']:.4g} nats/token "
            "(what the run learnt: lower is better)"
        )
    return "\n".join(lines)


def _value(log: dict, key: str) -> str:
    return f"{log[key]:.4g}" if key in log else "not measured"
