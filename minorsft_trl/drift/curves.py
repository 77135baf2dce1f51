"""The paper's Figure 1 for one run: loss, deviation m_theta and the loss's weights or KL anchor over the steps, and
the drift measures of its evaluations."""

from pathlib import Path

import transformers

from .steering import COEF_KEY

logger = transformers.utils.logging.get_logger(__name__)

PANEL_TITLES = {
    "deviation": "deviation m_theta (eq. 8)",
    "minor_weight": "minor weight 2σ(-βr)",
    "iw_weight": "importance weight min(exp(r/m), max)",
    "kl": "KL(π_ref ‖ π_θ) per answer token",
    "forward_kl": "forward KL(π_ref ‖ π_θ) on reference samples",
    "forward_kl_sampled": "forward KL on reference samples (sampled-token estimate)",
    "nll_change": "NLL change on general text",
    COEF_KEY: "KL anchor's coefficient, steered",
}
# Per-example weights, drawn with their min-max band
WEIGHTS = ("minor_weight", "iw_weight")
# Measured at evaluations only (`minorsft_trl.drift.live`)
DRIFT = ("forward_kl", "forward_kl_sampled", "nll_change")


def plot_training_curves(
    log_history: list[dict],
    path: str | Path,
    title: str = "",
    max_forward_kl: float | None = None,
    target_forward_kl: float | None = None,
) -> Path | None:
    """Save a PNG with one panel per logged curve: `loss`, `deviation`, the loss's weights (`minor_weight`,
    `iw_weight`) with their min-max band, its KL anchor (`kl`), and the drift measures of the evaluations
    (`eval_forward_kl`, `eval_nll_change`). `log_history` is `drift_log_history(trainer.state)` (the trainer's log
    led by the drift before the first step, `minorsft_trl.drift.live`) or `Trainer.state.log_history`; curves that
    were not logged are left out. `max_forward_kl` and `target_forward_kl`, the drift budgets, are drawn as lines on
    the forward KL; a coefficient steered to `target_forward_kl` (`kl_coef`, logged every step) has a panel of its
    own, on a log scale.

    A plot never fails the run it illustrates: without matplotlib (the `embedded` extra) or without a logged training
    loss (a run shorter than `logging_steps`), it says why and returns `None`."""
    train = [log for log in log_history if "loss" in log]
    evaluation = [log for log in log_history if any(key.startswith("eval_") for key in log)]
    panels = [key for key in ("loss", "deviation", *WEIGHTS, "kl", COEF_KEY) if any(key in log for log in train)]
    if not panels:
        logger.warning("No training curves plotted: the run logged no training loss (shorter than `logging_steps`).")
        return None
    try:
        import matplotlib
    except ImportError:
        logger.warning("No training curves plotted: matplotlib is not installed (`pip install matplotlib`).")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels += [key for key in DRIFT if any(f"eval_{key}" in log for log in evaluation)]

    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, key in zip(axes[0], panels, strict=True):
        logged = [log for log in train if key in log]
        steps = [log["step"] for log in logged]
        if logged:
            axis.plot(steps, [log[key] for log in logged], marker=".", label="train")
        if key in WEIGHTS:
            axis.fill_between(
                steps,
                [log[f"{key}_min"] for log in logged],
                [log[f"{key}_max"] for log in logged],
                alpha=0.25,
                label="min-max",
            )
            axis.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        eval_logged = [log for log in evaluation if f"eval_{key}" in log]
        if eval_logged:
            eval_steps = [log["step"] for log in eval_logged]
            axis.plot(eval_steps, [log[f"eval_{key}"] for log in eval_logged], marker="o", label="eval")
        if max_forward_kl is not None and key.startswith("forward_kl"):
            axis.axhline(max_forward_kl, color="tab:red", linestyle="--", label="max_forward_kl")
        if target_forward_kl is not None and key.startswith("forward_kl"):
            axis.axhline(target_forward_kl, color="tab:green", linestyle="--", label="target_forward_kl")
        if key == COEF_KEY:
            axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(PANEL_TITLES.get(key, key))
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
