"""The drift budget (`max_forward_kl`): the result of a budgeted run is a model within budget, or the run stops with
an error that says why.

Like `load_best_model_at_end`, it relies on checkpoints saved at evaluations (`MinorSFTConfig` checks it). The
candidates for the result are checkpoints whose drift was measured within budget:

- the model the run starts from, measured before the first step: a fresh run saves it as `checkpoint-0`, a resumed run
  has it as the checkpoint it resumed from (over budget, the run stops there with an error);
- every checkpoint saved after an evaluation within budget (with `eval_strategy="steps"` the Trainer also evaluates
  the last step, so the weights training ends with are measured too).

An evaluation over budget stops training without saving, and the trainer then loads the last candidate and records it
in its state as `load_best_model_at_end` does (`best_model_checkpoint`, `best_global_step`: the step of the weights),
see `MinorSFTTrainer.train`.
"""

import os

import transformers
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoints import has_manifest, is_complete
from ..errors import InputError
from .live import FORWARD_KL, FORWARD_KL_SAMPLED

logger = transformers.utils.logging.get_logger(__name__)


class DriftBudgetCallback(TrainerCallback):
    """Watches `eval_forward_kl` (or `eval_forward_kl_sampled`) against `max_forward_kl`.

    Attributes:
        within_budget_checkpoint: the last checkpoint measured within budget: the run's starting model, then each
            checkpoint saved after an evaluation within budget.
        within_budget_step: its step.
        exceeded: `(step, forward KL)` of the evaluation that went over budget, if one did.
    """

    def __init__(self, trainer, max_forward_kl: float):
        self.trainer = trainer
        self.max_forward_kl = max_forward_kl
        self.within_budget_checkpoint: str | None = None
        self.within_budget_step: int | None = None
        self.exceeded: tuple[int, float] | None = None
        self._last_within_step: int | None = None
        self._training = False  # an evaluation outside `train()` has no run to stop, nor a result to keep

    def on_train_begin(self, args, state, control, **kwargs):
        """Measure the model the run starts from and keep it as the first candidate, so that even a first evaluation
        over budget has a result within budget (the model the run started from)."""
        self.exceeded = None
        resumed_from = self.trainer._resumed_from_checkpoint
        name, value = measured_forward_kl(self.trainer.drift.metrics(), prefix="")
        if value > self.max_forward_kl:
            start = f"the checkpoint it resumes from, {resumed_from}," if resumed_from else "the model it starts from"
            raise InputError(
                f"max_forward_kl={self.max_forward_kl:g}: {start} is already over the drift budget ({name}="
                f"{value:.4g} against its reference), so no model within it could be kept. Raise max_forward_kl, or "
                "give the reference the run should stay close to (ref_model_name_or_path)."
            )
        start_checkpoint = resumed_from
        if start_checkpoint is None:  # a fresh run: its starting model is on disk only once saved
            self.trainer._save_checkpoint(self.trainer.model_wrapped, trial=None)
            output_dir = self.trainer._get_output_dir(trial=None)
            start_checkpoint = os.path.join(output_dir, checkpoint_name(state.global_step))
        self.within_budget_checkpoint, self.within_budget_step = start_checkpoint, state.global_step
        self._training = True

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name, value = measured_forward_kl(metrics or {})
        if value is None or not self._training:
            return
        if value <= self.max_forward_kl:
            self._last_within_step = state.global_step
            return
        self.exceeded = (state.global_step, value)
        control.should_training_stop = True
        control.should_save = False  # the over-budget model is not a result
        logger.warning(
            f"Drift budget exceeded at step {state.global_step}: {name}={value:.4g} > max_forward_kl="
            f"{self.max_forward_kl:g}. Training stops here; the result is the last checkpoint within budget, "
            f"{self.within_budget_checkpoint} (step {self.within_budget_step})."
        )

    def on_save(self, args, state, control, **kwargs):
        if self._last_within_step == state.global_step:
            self.within_budget_checkpoint = os.path.join(args.output_dir, checkpoint_name(state.global_step))
            self.within_budget_step = state.global_step

    def restore_within_budget(self) -> None:
        """After an evaluation over budget: `load_best_model_at_end`'s loader on the last checkpoint within the
        budget, recorded in the state as that loader records the best model: `trainer_state.json` then names the step
        of the weights the trainer holds (`best_global_step`), `global_step` the steps it trained."""
        checkpoint = self.within_budget_checkpoint
        if not os.path.isdir(checkpoint) or (has_manifest(checkpoint) and not is_complete(checkpoint)):
            # Transformers' loader would only warn and keep the weights over budget
            raise RuntimeError(
                f"The drift budget was exceeded at step {self.exceeded[0]}, and the last checkpoint within it, "
                f"{checkpoint}, is missing or incomplete (removed since it was saved): the model in memory is over "
                "budget and is not a result. Keep that checkpoint until training ends, and run again."
            )
        self.trainer.state.best_model_checkpoint = checkpoint
        self.trainer.state.best_global_step = self.within_budget_step
        self.trainer._load_best_model()
        start = " (the model the run started from)" if self.within_budget_step == 0 else ""
        logger.warning(
            f"Loaded {checkpoint}{start}, the last checkpoint within the drift budget: the weights are those of step "
            f"{self.within_budget_step}."
        )


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def measured_forward_kl(metrics: dict[str, float], prefix: str = "eval_") -> tuple[str | None, float | None]:
    """The forward KL an evaluation logged: the full-vocabulary one, else its sampled-token estimate. `prefix=""`
    reads the drift measures as `DriftMeasures.metrics` returns them, before they are logged."""
    for key in (f"{prefix}{FORWARD_KL}", f"{prefix}{FORWARD_KL_SAMPLED}"):
        if key in metrics:
            return key, metrics[key]
    return None, None
