"""The drift a run reached, as a section of its model card."""

import os

from .budget import DriftBudgetCallback, measured_forward_kl

MEASURES = {
    "eval_forward_kl": "forward KL(π_ref ‖ π_θ) per token, on reference samples",
    "eval_forward_kl_sampled": "forward KL per token on reference samples (sampled-token estimate)",
    "eval_nll_change": "NLL change per token on general text",
    "eval_deviation": "m_theta on the eval answers (paper eq. 8)",
    "eval_answer_nll": "NLL per token of the eval answers",
}


def drift_section(log_history: list[dict], budget: DriftBudgetCallback | None = None) -> str | None:
    """A markdown section with the drift measures of every evaluation (a row per step), and the budget's verdict;
    `None` if the run logged none."""
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
    return "\n".join(lines) + "\n"
