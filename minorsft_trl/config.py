"""`MinorSFTConfig`: TRL's `SFTConfig` plus the fields of the reference-aware losses."""

import math
from dataclasses import dataclass, field

from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import SFTConfig

from .loss_types import REFERENCE_LOSSES, LossType

TRL_LOSS_TYPES = ("nll", "dft")
REFERENCE_LOSS_TYPES = tuple(REFERENCE_LOSSES)
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
            - `"asft"`: Anchored SFT (arXiv 2509.23753), TRL's DFT token loss plus `kl_coef` times the per-token
              `KL(pi_ref || pi_theta)` over the vocabulary, averaged over answer tokens.
            - `"sft_kl"`: the per-example mean NLL plus `kl_coef` times the example's mean per-token
              `KL(pi_ref || pi_theta)`, averaged over examples.
            - `"iw_sft"`: importance-weighted SFT (arXiv 2507.12856), each token's NLL weighted by its example's
              `min(exp(log(pi_theta(y|x) / pi_ref(y|x)) / |y|), iw_weight_max)`, averaged over answer tokens.
            - `"nll"`, `"dft"`: TRL's own losses, unchanged (no reference unless `log_deviation=True`).
        beta (`float`, *optional*, defaults to `0.04`):
            Temperature of the implicit reward of `minor_sft` and `sft_dpo`, as in DPO. The paper's best for both is
            `0.04`.
        kl_coef (`float`, *optional*, defaults to `0.05`):
            Weight `lambda` of the KL anchor of `asft` and `sft_kl`. `0.05` is the ASFT paper's recommendation.
        iw_weight_max (`float`, *optional*, defaults to `16.0`):
            Upper clip of the `iw_sft` importance weights, as in the iw-SFT authors' code.
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
            "help": "Loss: 'minor_sft' (Minor SFT, arXiv 2408.10642), 'sft_dpo' (the paper's 'SFT using DPO'), "
            "'asft' (Anchored SFT), 'sft_kl' (SFT + KL anchor), 'iw_sft' (importance-weighted SFT), or TRL's 'nll' "
            "and 'dft'.",
            "choices": list(LOSS_TYPES) + ["chunked_nll"],
        },
    )
    beta: float = field(
        default=0.04,
        metadata={"help": "Temperature of the implicit reward beta * log(pi/pi_ref), as in DPO. Must be > 0."},
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Weight of the KL anchor KL(pi_ref || pi_theta) of 'asft' and 'sft_kl'. Must be >= 0."},
    )
    iw_weight_max: float = field(
        default=16.0,
        metadata={"help": "Upper clip of the 'iw_sft' importance weights. Must be > 0."},
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
        _check_number("beta", self.beta, positive=True, hint="The paper's best is beta=0.04.")
        _check_number("kl_coef", self.kl_coef, positive=False, hint="The ASFT paper recommends kl_coef=0.05.")
        _check_number("iw_weight_max", self.iw_weight_max, positive=True, hint="The iw-SFT authors use 16.")
        reference_loss = self.reference_loss
        if self.precompute_ref_log_probs and reference_loss and not reference_loss.reference.can_be_precomputed:
            precomputable = [name for name, loss in REFERENCE_LOSSES.items() if loss.reference.can_be_precomputed]
            raise ValueError(
                f"precompute_ref_log_probs=True with loss_type={self.loss_type!r}: this loss needs "
                f"{reference_loss.reference.value}, which cannot be cached per example. Set "
                "precompute_ref_log_probs=False (the reference then runs a forward each step), or use a loss that "
                f"needs only per-example log-probs ({', '.join(precomputable)})."
            )
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
    def reference_loss(self) -> LossType | None:
        """The declaration of the reference-aware loss (`minorsft_trl.loss_types`), `None` for TRL's own losses."""
        return REFERENCE_LOSSES.get(self.loss_type)

    def describe_loss(self) -> str:
        """The loss and the settings it reads, e.g. `"minor_sft (beta=0.04, lr=2e-05)"`."""
        settings = self.reference_loss.settings if self.reference_loss is not None else ()
        values = [f"{name}={getattr(self, name)}" for name in settings] + [f"lr={self.learning_rate}"]
        return f"{self.loss_type} ({', '.join(values)})"

    @property
    def uses_reference(self) -> bool:
        """Whether training runs a reference: for the loss itself, or only to log the deviation."""
        return self.reference_loss is not None or self.log_deviation


def _check_number(name: str, value, positive: bool, hint: str) -> None:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {bound}, got {value!r} ({type(value).__name__}). {hint}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value}. {hint}")
