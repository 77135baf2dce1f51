"""`MinorSFTConfig`: TRL's `SFTConfig` plus the fields of the reference-aware losses."""

import math
from dataclasses import dataclass, field

from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import SFTConfig

TRL_LOSS_TYPES = ("nll", "dft")
REFERENCE_LOSS_TYPES = ("minor_sft", "sft_dpo")
LOSS_TYPES = TRL_LOSS_TYPES + REFERENCE_LOSS_TYPES


@dataclass
class MinorSFTConfig(SFTConfig):
    r"""
    Configuration class for [`MinorSFTTrainer`]: every field of TRL's `SFTConfig`, plus the ones below.

    Args:
        loss_type (`str`, *optional*, defaults to `"minor_sft"`):
            - `"minor_sft"`: Minor SFT (arXiv 2408.10642, eq. 7), the per-example mean NLL weighted by
              `2 * sigmoid(-beta * log(pi_theta(y|x) / pi_ref(y|x)))`, averaged over the examples of the batch.
            - `"sft_dpo"`: the paper's "SFT using DPO" (eq. 3),
              `-log sigmoid(beta * log(pi_theta(y|x) / pi_ref(y|x)))`.
            - `"nll"`, `"dft"`: TRL's own losses, unchanged (no reference unless `log_deviation=True`).
        beta (`float`, *optional*, defaults to `0.04`):
            Temperature of the implicit reward, as in DPO. The paper's best for both reference losses is `0.04`.
        ref_model_name_or_path (`str`, *optional*):
            Path or Hub id of a separate reference model. If `None`, a PEFT model is its own reference with its
            adapters disabled, and full fine-tuning uses a frozen copy of the policy as training starts.
        log_deviation (`bool`, *optional*, defaults to `False`):
            With `loss_type="nll"` or `"dft"`, run the reference forward anyway to log `deviation` and `log_ratio`, so
            plain SFT compares with Minor SFT on the same scale. Costs one no-grad forward per step.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `False`):
            Compute the reference's summed answer log-prob of every train and eval example once, before training,
            and cache it on disk, keyed by what changes the numbers: the reference (weights, configuration,
            attention implementation, adapter configuration), the batches as the collator builds them, and the
            autocast precision the forward runs under. A cache hit is used once a live pass over a sample agrees.
            Training then runs no reference forward and frees a separate reference model. A second run with another
            learning rate or beta reuses the cache.
        precompute_ref_batch_size (`int`, *optional*):
            Batch size of the precompute pass; defaults to `per_device_train_batch_size` (eval data:
            `per_device_eval_batch_size`).
        ref_cache_dir (`str`, *optional*):
            Where the precomputed reference log-probs are cached. Defaults to `ref_logps` in the per-user cache
            (`$MINORSFT_TRL_CACHE`, else `~/.cache/minorsft_trl`), so separate runs share it.

    Unlike `SFTConfig`, an unset `bf16` stays off on a machine without a bf16 accelerator (where TRL's default fails
    unless `use_cpu=True`).
    """

    loss_type: str = field(
        default="minor_sft",
        metadata={
            "help": "Loss: 'minor_sft' (Minor SFT, arXiv 2408.10642), 'sft_dpo' (the paper's 'SFT using DPO'), or "
            "TRL's 'nll' and 'dft'.",
            "choices": list(LOSS_TYPES) + ["chunked_nll"],
        },
    )
    beta: float = field(
        default=0.04,
        metadata={"help": "Temperature of the implicit reward beta * log(pi/pi_ref), as in DPO. Must be > 0."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub id of a separate reference model. Default: the PEFT model with adapters disabled, or "
            "a frozen copy of the policy as training starts."
        },
    )
    log_deviation: bool = field(
        default=False,
        metadata={
            "help": "With loss_type 'nll' or 'dft', run the reference forward to log `deviation` and `log_ratio`."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference log-probs of the train and eval data once, before training, and cache them "
            "on disk: training then runs no reference forward and needs no reference weights."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the precompute pass. Defaults to the per-device train/eval batch size."},
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of the precomputed reference cache, shared by runs. Defaults to "
            "`$MINORSFT_TRL_CACHE/ref_logps` (`~/.cache/minorsft_trl/ref_logps`)."
        },
    )

    def __post_init__(self):
        # TRL turns bf16 on when unset, which transformers rejects on a machine without a bf16 accelerator unless
        # `use_cpu=True`; there, unset means full precision, so `args=None` runs on any machine.
        if self.bf16 is None and not (self.fp16 or self.use_cpu or is_torch_bf16_gpu_available()):
            self.bf16 = is_torch_xla_available()
        self._check_sizes()
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}, got {self.loss_type!r}. "
                "Use 'minor_sft' for Minor SFT."
            )
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise ValueError(f"beta must be a number > 0, got {self.beta!r} ({type(self.beta).__name__}).")
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}. The paper's best is beta=0.04.")
        if self.precompute_ref_log_probs and not self.uses_reference:
            raise ValueError(
                f"precompute_ref_log_probs=True with loss_type={self.loss_type!r} and log_deviation=False: there is "
                "no reference to precompute. Drop precompute_ref_log_probs, or set log_deviation=True."
            )
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ValueError(f"precompute_ref_batch_size must be >= 1, got {self.precompute_ref_batch_size}.")

    def _check_sizes(self) -> None:
        """Values that transformers accepts and only trips over once training starts (a division by zero, a NaN
        step), after the output directory was made."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if (
            not isinstance(self.learning_rate, (int, float))
            or not math.isfinite(self.learning_rate)
            or self.learning_rate < 0
        ):
            raise ValueError(
                f"learning_rate must be a finite number >= 0, got {self.learning_rate!r}. The paper's best for Minor "
                "SFT is 2e-5."
            )

    @property
    def uses_reference(self) -> bool:
        """Whether training runs a reference: for the loss itself, or only to log the deviation."""
        return self.loss_type in REFERENCE_LOSS_TYPES or self.log_deviation
