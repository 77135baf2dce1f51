"""The reference self-check: a wrong reference gives plausible curves, so check it against what it must be.

Where the policy starts equal to its reference (a new adapter with its adapters disabled, a re-trained adapter and its
frozen copy, full fine-tuning and its frozen copy), the per-example log-ratios of the first batch, computed before any
optimizer step with both models in reference mode, must be 0 up to float noise. Where they legitimately differ (an
explicit `ref_model`, prompt learning's virtual tokens), the initial deviation is logged once.
"""

import math
from dataclasses import dataclass

import transformers

logger = transformers.utils.logging.get_logger(__name__)


def deviation_tolerance(half_precision: bool, same_batch: bool) -> float:
    """The largest `|log-ratio per answer token|` of one example that counts as 0.

    Args:
        half_precision: whether either side computes in bf16/fp16 (autocast, or half-precision weights).
        same_batch: whether the reference scored this very batch (on the fly), rather than other batches (the
            precompute pass: other padding, other rows alongside).

    Measured by `benchmarks/reference_check_noise.py` on SmolLM2-135M-Instruct, 64 BIG-bench examples. Noise on the
    same batch: an identity adapter (LoRA, DoRA) against its disabled base is exactly 0 in float32 and under bf16
    autocast; a bf16 copy of the LM head (QLoRA's `modules_to_save`) against the float32 head differs by 0.0054.
    Noise between batch layouts: 3.8e-6 in float32, 0.04 under bf16 autocast. A wrong reference on a real model is
    off by nats (PiSSA's rewritten base: 20 at most, 15 on average); on the tiny random test models, whose
    predictions are nearly uniform, by hundredths (PiSSA: 0.021), which only the same-batch tolerances catch.
    """
    if not half_precision:
        return 1e-4
    return 0.01 if same_batch else 0.1


@dataclass(frozen=True)
class ReferenceCheck:
    """What a run's reference is, and whether the policy starts equal to it.

    Attributes:
        description: the reference in words, for the log and the error ("the base model with the adapters disabled").
        starts_at_reference: whether the policy before its first update must give the reference's log-probs.
        hint: what to do when it does not.
    """

    description: str
    starts_at_reference: bool
    hint: str

    def verify(self, max_abs_deviation: float, mean_deviation: float, tolerance: float) -> None:
        """Stop the run if the policy must start at its reference and does not; otherwise log the outcome.

        Args:
            max_abs_deviation: the largest `|r_i / m_i|` over the examples of the first batch, on all processes.
            mean_deviation: the mean of `r_i / m_i` over the same examples (the paper's m_theta at step 0).
            tolerance: the largest `|r_i / m_i|` that counts as 0.
        """
        if not self.starts_at_reference:
            logger.warning(
                f"The reference is {self.description}, which the policy does not start from: before the first update "
                f"the deviation m_theta is already {mean_deviation:.4g} nats per answer token (largest per example "
                f"{max_abs_deviation:.4g}). `deviation` and the brake measure drift from that reference."
            )
            return
        if not math.isfinite(max_abs_deviation):
            raise RuntimeError(
                f"Reference check failed: on the first batch the log-ratio per answer token of the policy against "
                f"{self.description} is {max_abs_deviation} for one example: the policy or the reference gives "
                "non-finite log-probs, so their weights hold NaN or inf. Check the model (and the reference) you load."
            )
        if max_abs_deviation > tolerance:
            raise RuntimeError(
                f"Reference check failed: the reference is {self.description}, which must give the policy's own "
                f"log-probs before the first update, but on the first batch the log-ratio per answer token is "
                f"{max_abs_deviation:.4g} nats for one example (mean {mean_deviation:.4g}; tolerance {tolerance:g}). "
                f"Training would brake and measure drift against another model than the one the run starts from. "
                f"{self.hint}"
            )
        logger.info(
            f"Reference check passed: {self.description} gives the policy's log-probs before the first update "
            f"(largest log-ratio per answer token {max_abs_deviation:.2g}, tolerance {tolerance:g})."
        )
