"""The drift budget (`max_forward_kl`): stop at the first evaluation over budget and keep the last checkpoint within.

Like `load_best_model_at_end`, it relies on checkpoints saved at evaluations (`MinorSFTConfig` checks it): the
checkpoint saved after an evaluation within budget is the candidate result; an evaluation over budget stops training
without saving, and the trainer then loads the last candidate (`MinorSFTTrainer.train`).
"""

import os

import transformers
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .live import FORWARD_KL, FORWARD_KL_SAMPLED

logger = transformers.utils.logging.get_logger(__name__)


class DriftBudgetCallback(TrainerCallback):
    """Watches `eval_forward_kl` (or `eval_forward_kl_sampled`) against `max_forward_kl`.

    Attributes:
        within_budget_checkpoint: the last checkpoint saved after an evaluation within budget.
        exceeded: `(step, forward KL)` of the evaluation that went over budget, if one did.
    """

    def __init__(self, max_forward_kl: float):
        self.max_forward_kl = max_forward_kl
        self.within_budget_checkpoint: str | None = None
        self.exceeded: tuple[int, float] | None = None
        self._last_within_step: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name, value = measured_forward_kl(metrics or {})
        if value is None:
            return
        if value <= self.max_forward_kl:
            self._last_within_step = state.global_step
            return
        self.exceeded = (state.global_step, value)
        control.should_training_stop = True
        control.should_save = False  # the over-budget model is not a result
        logger.warning(
            f"Drift budget exceeded at step {state.global_step}: {name}={value:.4g} > max_forward_kl="
            f"{self.max_forward_kl:g}. Training stops here; "
            + (
                f"the result is the last checkpoint within budget, {self.within_budget_checkpoint}."
                if self.within_budget_checkpoint
                else "no checkpoint within budget was saved, so the model stays as it is now, over budget (save "
                "checkpoints at evaluations, or evaluate more often with a smaller eval_steps)."
            )
        )

    def on_save(self, args, state, control, **kwargs):
        if self._last_within_step == state.global_step:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self.within_budget_checkpoint = os.path.join(args.output_dir, checkpoint)


def measured_forward_kl(metrics: dict[str, float]) -> tuple[str | None, float | None]:
    """The forward KL an evaluation logged: the full-vocabulary one, else its sampled-token estimate."""
    for key in (f"eval_{FORWARD_KL}", f"eval_{FORWARD_KL_SAMPLED}"):
        if key in metrics:
            return key, metrics[key]
    return None, None
