"""A drift budget that steers (`target_forward_kl`): the KL anchor's coefficient of `sft_kl` and `asft` is
controlled so that the run's forward KL from its reference (`eval_forward_kl`, the budget's unit) ends within the
budget, close to it: the controller's set point is `MARGIN` (90%) of the budget.

Two loops, as the adaptive KL controller of RL fine-tuning (Ziegler et al. 2019) with a calibration on top:

- **every optimizer step**, the drift is estimated from what the step already computed: the mean per-token
  `KL(pi_ref || pi_theta)` of the anchor on the step's training answers (all micro-batches, all processes), smoothed
  over steps (`SMOOTHING`), times the calibration below. The coefficient then moves on a log scale, a dual-ascent step
  on the constraint `forward KL <= target`, from the first evaluation on (before it, the coefficient stays at
  `kl_coef`: the two KLs below can differ twentyfold, and nothing says by how much until an evaluation has measured
  both):

      log kl_coef += GAIN * clip(log(estimate / (MARGIN * target)), -1, 1)

  up while the run is over budget, down while it has room, at most a factor `exp(GAIN)` per step, within
  `COEF_RANGE`;
- **at every evaluation**, the calibration becomes `eval_forward_kl / smoothed training KL`: the anchor's KL is taken
  on the training answers, where the run learns its task (the reference's distribution there is the one the data
  moves away from), the budget's forward KL on the reference's own continuations of held-out prompts. They rise
  together but are not the same number: in this project's comparisons the second was 0.04 to 0.76 times the first on
  held-out answers, and moved during a run, so the ratio is measured again at every evaluation.

`kl_coef` is where the coefficient starts. Every process sees the same sums (gathered by `WindowMetrics`) and the
same evaluation, so every process steers to the same coefficient. The state (coefficient, smoothed KL, calibration,
target) travels in `trainer_state.json` (`stateful_callbacks`), so a resumed run continues the same path.
"""

import math

import transformers
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..errors import InputError
from .budget import measured_forward_kl
from .live import timed

logger = transformers.utils.logging.get_logger(__name__)

# Per step, the largest move of log(kl_coef): a factor 1.22 per step, 7.4 in 10 steps
GAIN = 0.2
# Weight of the newest step in the smoothed training KL (an exponential moving average)
SMOOTHING = 0.3
# The coefficient stays within: below 1e-3 the anchor is nothing against the NLL, above 1e2 it is all there is
COEF_RANGE = (1e-3, 1e2)
# The controller steers to this share of the budget: a run's evaluations scatter about the set point (-46% to +15% in
# a run of 125 steps on si_conversion steered to the budget itself, which ended at 1.03 times it), and the budget is
# a ceiling
MARGIN = 0.9
# Logged every step next to TRL's metrics
COEF_KEY, CALIBRATION_KEY = "kl_coef", "kl_calibration"


class KLCoefController(TrainerCallback, ExportableState):
    """Steers the KL anchor's coefficient to `target` (see the module docstring).

    Args:
        target: `target_forward_kl`, in nats per token of `eval_forward_kl`.
        start: `kl_coef`, the coefficient of the first step.

    Attributes:
        coef: the coefficient the next step trains with.
        smoothed_kl: the smoothed per-token anchor KL of the training steps so far (`None` before the first).
        calibration: `eval_forward_kl` over `smoothed_kl`, as at the last evaluation (`None` before the first: the
            coefficient is not steered until then).
        at_ceiling_over_budget: `(step, forward KL)` of the first evaluation over budget with the coefficient at its
            ceiling, if one was.
        seconds: wall time spent in the controller so far (the evaluations it calibrates on are the trainer's).
    """

    def __init__(self, target: float, start: float):
        self.target = target
        self.start = start
        self.coef = _clipped(start)
        self.smoothed_kl: float | None = None
        self.calibration: float | None = None
        self.at_ceiling_over_budget: tuple[int, float] | None = None
        self._step_kl_sum = 0.0
        self._step_kl_count = 0.0
        self.seconds = 0.0

    # ------------------------------------------------------------------ the loops

    @timed
    def add(self, kl_sum: float, kl_count: float) -> None:
        """One training micro-batch's anchor KL, summed over its answer tokens and over every process, and their
        count (both as `WindowMetrics.add_reference_terms` gathers them)."""
        self._step_kl_sum += kl_sum
        self._step_kl_count += kl_count

    @property
    def estimate(self) -> float | None:
        """The forward KL the controller steers on: the smoothed training KL, calibrated."""
        if self.smoothed_kl is None or self.calibration is None:
            return None
        return self.calibration * self.smoothed_kl

    @timed
    def on_step_end(self, args, state, control, **kwargs):
        """After each optimizer step: smooth the step's KL in, and move the coefficient of the next step."""
        if self._step_kl_count == 0:
            return
        step_kl = max(self._step_kl_sum / self._step_kl_count, 0.0)  # the drawn anchor's estimate can dip below 0
        self._step_kl_sum = self._step_kl_count = 0.0
        previous = step_kl if self.smoothed_kl is None else self.smoothed_kl
        self.smoothed_kl = SMOOTHING * step_kl + (1 - SMOOTHING) * previous
        if self.calibration is None:
            return
        self.coef = _clipped(self.coef * math.exp(GAIN * self.error()))

    def error(self) -> float:
        """`clip(log(estimate / (MARGIN * target)), -1, 1)`: positive over the set point, negative with room."""
        estimate = self.estimate
        if not estimate:
            return -1.0
        return max(-1.0, min(1.0, math.log(estimate / (MARGIN * self.target))))

    @timed
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Calibrate on the budget's own measure; say so once if the run is over budget with the anchor as strong as
        the controller makes it."""
        name, value = measured_forward_kl(metrics or {})
        if value is None or not self.smoothed_kl or state.global_step == 0:
            return
        self.calibration = max(value, 0.0) / self.smoothed_kl
        if value > self.target and self.coef >= COEF_RANGE[1] and self.at_ceiling_over_budget is None:
            self.at_ceiling_over_budget = (state.global_step, value)
            logger.warning(
                f"target_forward_kl={self.target:g} is not met at step {state.global_step} ({name}={value:.4g}) with "
                f"the KL anchor at its largest coefficient, kl_coef={COEF_RANGE[1]:g}: the learning rate moves the "
                "model faster than the anchor can hold it. Lower the learning rate, or raise the budget; set "
                "max_forward_kl too to stop and keep the last checkpoint within it."
            )

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "args": {"target": self.target, "start": self.start},
            "attributes": {
                "coef": self.coef,
                "smoothed_kl": self.smoothed_kl,
                "calibration": self.calibration,
            },
        }

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run continues the path its checkpoint stopped on (its state in `trainer_state.json`)."""
        self._step_kl_sum = self._step_kl_count = 0.0
        if state.global_step == 0:
            return
        stored = state.stateful_callbacks.get(type(self).__name__)
        if stored is None:
            raise InputError(
                f"target_forward_kl={self.target:g}: the checkpoint resumed from (step {state.global_step}) holds no "
                "steered coefficient (it was trained without target_forward_kl, or by an older minorsft_trl), so the "
                "run cannot continue its path. Resume it without target_forward_kl, or start the budgeted run afresh."
            )
        if stored["args"]["target"] != self.target:
            raise InputError(
                f"target_forward_kl={self.target:g}, but the checkpoint resumed from was steered to "
                f"target_forward_kl={stored['args']['target']:g}. Resume with that budget, or start a new run "
                "(another output_dir) for this one."
            )
        for name, value in stored["attributes"].items():
            setattr(self, name, value)
        state.stateful_callbacks[type(self).__name__] = self.state()


def _clipped(coef: float) -> float:
    return min(max(coef, COEF_RANGE[0]), COEF_RANGE[1])
