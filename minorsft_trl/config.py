"""`MinorSFTConfig`: TRL's `SFTConfig` plus the fields of the reference-aware losses."""

import argparse
import importlib.util
import math
from dataclasses import dataclass, field, fields

import torch
import transformers
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import SFTConfig
from trl.trainer.utils import get_config_model_id

from .errors import InputError
from .loss_types import REFERENCE_LOSSES, LossType, MeanOver, ReferenceNeed

logger = transformers.utils.logging.get_logger(__name__)

# Above it, `sft_dpo`'s first steps are more than half the summed answer NLL gradient
SFT_DPO_LARGE_BETA = 1.0

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
        precompute_ref_log_probs (`bool` or `"auto"`, *optional*, defaults to `"auto"`):
            Compute the reference's summed answer log-prob of every train and eval example once, before training,
            and cache it on disk, keyed by what changes the numbers: the reference (weights, configuration,
            attention implementation, adapter configuration), the batches as the collator builds them, and the
            autocast precision the forward runs under. A cache hit is used once a live pass over a sample agrees.
            Training then runs no reference forward; `True` also frees a separate reference model, which `"auto"`
            keeps for the datasets passed to `evaluate` later (scored on the fly). A second run with another
            learning rate or beta reuses the cache. `"auto"` turns it on wherever it can serve (the loss reads the
            reference, the datasets are not streamed, the cache directory is writable;
            under ZeRO-3 and FSDP too, every process computing its share) and says which in one log line; `True` asks
            for it (an error where it cannot serve), `False` runs the reference at every step. For the KL losses
            (`sft_kl`, `asft`) the pass also keeps the reference's `ref_top_k` most likely tokens at every answer
            token, the mass of the rest and `ref_tail_samples` tokens drawn from the rest: the anchor is then an
            unbiased estimate of the full KL (`minorsft_trl.reference.topk_anchor`) at plain SFT's step time, and
            costs `8 * (ref_top_k + ref_tail_samples) + 4` bytes per answer token on disk (a cache that would not fit
            on its disk stops the run before the pass, with the size and the fix). Not under ZeRO-3, where `"auto"`
            keeps the exact anchor on the fly.
        ref_top_k (`int`, *optional*, defaults to `64`):
            The reference's most likely tokens per answer token that the precomputed KL anchor of `sft_kl` and `asft`
            keeps. With draws from the rest the anchor is unbiased at any `k` (its mean was within 1.3% of the full
            KL at every measured `k`); a larger `k` makes it less noisy per token at `8` bytes per token each: 64 is
            the smallest measured `k` whose per-token spread stayed within a tenth of the KL's mean on the main
            recipe's answers and on chat replies (README, "The KL anchor precomputed"). More than the vocabulary keeps
            all of it (the exact anchor).
        ref_tail_samples (`int`, *optional*, defaults to `32`):
            Tokens drawn once per answer token from the reference's distribution outside its top `ref_top_k`, which
            make the precomputed anchor an unbiased estimate of the full KL. `0` keeps the KL coarsened to the top-k
            and one bin for the rest, which understates it.
        precompute_ref_batch_size (`int`, *optional*):
            Batch size of the precompute pass; defaults to `per_device_train_batch_size` (eval data:
            `per_device_eval_batch_size`).
        ref_cache_dir (`str`, *optional*):
            Where the precomputed reference log-probs are cached. Defaults to `ref_logps` in the per-user cache
            (`$MINORSFT_TRL_CACHE`, else `~/.cache/minorsft_trl`), so separate runs share it.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Set every dropout of the policy to 0 (PEFT's `lora_dropout` and the model's own, attention included) when
            training reads the reference (every `loss_type` but `nll` and `dft`, or `log_deviation=True`), as TRL's
            `DPOConfig` does: the policy's log-probs come from a training forward and the reference's from an
            eval-mode one, so dropout would make the log-ratio, the weights and the KL anchor noise from the first
            step. Plain `nll` and `dft` keep the model's dropout, as `SFTTrainer` does.
        eval_drift (`bool`, *optional*, defaults to `True`):
            Measure the drift from the reference at every evaluation and once before training (where it is 0), for
            every `loss_type`: `eval_forward_kl` (`KL(pi_ref || pi_theta)` per token over the whole vocabulary, on
            continuations the reference samples for `drift_num_prompts` held-out prompts; `eval_forward_kl_sampled`,
            the sampled-token estimate, where the run keeps no reference model), `eval_nll_change` (with
            `drift_text_dataset`) and `eval_deviation` (m_theta on the eval split's answers). On whenever the run has
            an eval dataset. See `minorsft_trl.drift`.
        drift_prompts (`str`, *optional*):
            A dataset (local file or folder, or a `datasets` name) whose `prompt` (text or conversation) or
            `messages` column gives the prompts of `eval_forward_kl`. Defaults to the eval split's prompts.
        drift_num_prompts (`int`, *optional*, defaults to `16`):
            How many prompts the reference continues for `eval_forward_kl` (the first ones).
        drift_max_new_tokens (`int`, *optional*, defaults to `32`):
            Length of each sampled continuation (temperature 1, no top-k or top-p). Samples are drawn once, with
            `drift_seed`, and cached next to the precomputed reference log-probs.
        drift_text_dataset (`str`, *optional*):
            General text (a `text` column, or `messages` rendered by the chat template) on which `eval_nll_change`,
            the change of the per-token NLL against the reference, is measured. Off when unset.
        drift_num_texts (`int`, *optional*, defaults to `32`):
            How many texts of `drift_text_dataset` (the first ones), each cut to `max_length` tokens.
        drift_seed (`int`, *optional*, defaults to `0`):
            Seed of the reference's samples (apart from `seed`: runs with other seeds are measured on the same text).
        max_forward_kl (`float`, *optional*):
            A drift budget: training stops at the first evaluation whose forward KL exceeds it, and the last checkpoint
            within budget is the result (save at evaluation steps, as for `load_best_model_at_end`): the model the run
            starts from, measured before the first step and saved as `checkpoint-0` (a run that starts over budget
            stops there with an error), or one saved after an evaluation within budget. See
            `minorsft_trl.drift.budget`.
        target_forward_kl (`float`, *optional*):
            A drift budget that steers: the KL anchor's coefficient of `sft_kl` and `asft` rises while the run drifts
            past the budget and falls while it has room, so that the run's forward KL (`eval_forward_kl`) ends at
            this value having learnt what it could within it; `kl_coef` is then the coefficient the run starts
            with, and the coefficient is logged as `kl_coef` every step. Needs evaluations (the controller calibrates
            on them) and one of those two losses. May be combined with `max_forward_kl` (at least as large) for a
            hard stop. See `minorsft_trl.drift.steering`.

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
    precompute_ref_log_probs: "BoolOrAuto" = field(
        default="auto",
        metadata={
            "help": "Compute the reference log-probs of the train and eval data once, before training, and cache them "
            "on disk (for sft_kl and asft also the KL anchor's top-k and draws): training then runs no reference "
            "forward. 'auto' (the default): wherever it can serve, keeping a "
            "separate reference for datasets passed to `evaluate` later; true: always, freeing that reference; false: "
            "never."
        },
    )
    ref_top_k: int = field(
        default=64,
        metadata={
            "help": "Tokens per answer token kept of the reference's distribution by the precomputed KL anchor of "
            "sft_kl and asft (its most likely ones)."
        },
    )
    ref_tail_samples: int = field(
        default=32,
        metadata={
            "help": "Tokens drawn per answer token from the reference's distribution outside its top ref_top_k, which "
            "make the precomputed KL anchor an unbiased estimate of the full KL (0: the KL coarsened to the top-k and "
            "the rest)."
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
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Set every dropout of the policy to 0 when training reads the reference (as DPOConfig does), so "
            "the log-ratio is 0 at the start. Plain 'nll' and 'dft' keep the model's dropout."
        },
    )

    eval_drift: bool = field(
        default=True,
        metadata={
            "help": "Measure the drift from the reference (forward KL on reference samples, NLL change on "
            "`drift_text_dataset`, m_theta on the eval answers) at every evaluation and before training."
        },
    )
    drift_prompts: str | None = field(
        default=None,
        metadata={"help": "Prompts for `eval_forward_kl` (`prompt` or `messages` column). Default: the eval split."},
    )
    drift_num_prompts: int = field(
        default=16, metadata={"help": "Number of prompts the reference continues for `eval_forward_kl`."}
    )
    drift_max_new_tokens: int = field(
        default=32, metadata={"help": "Tokens the reference samples per prompt for `eval_forward_kl`."}
    )
    drift_text_dataset: str | None = field(
        default=None,
        metadata={"help": "General text (`text` or `messages`) for `eval_nll_change`. Off when unset."},
    )
    drift_num_texts: int = field(default=32, metadata={"help": "Number of texts of `drift_text_dataset` to score."})
    drift_seed: int = field(default=0, metadata={"help": "Seed of the reference's samples for `eval_forward_kl`."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume training: `true` (or `latest`) takes the last complete checkpoint in `output_dir`; or "
            "give the path of a checkpoint folder (`output_dir/checkpoint-<step>`)."
        },
    )
    max_forward_kl: float | None = field(
        default=None,
        metadata={
            "help": "Drift budget: stop at the first evaluation whose forward KL exceeds it and keep the last "
            "checkpoint within budget (the starting model, saved as checkpoint-0, at the least). Must be > 0."
        },
    )

    target_forward_kl: float | None = field(
        default=None,
        metadata={
            "help": "Drift budget that steers: the KL anchor's coefficient of 'sft_kl' and 'asft' is controlled so "
            "that the forward KL (eval_forward_kl) ends at this value; kl_coef is where it starts. Must be > 0."
        },
    )

    def __post_init__(self):
        # TRL turns bf16 on when unset, which transformers rejects on a machine without a bf16 accelerator unless
        # `use_cpu=True`; there, unset means full precision, so `args=None` runs on any machine.
        if self.bf16 is None and not (self.fp16 or self.use_cpu or is_torch_bf16_gpu_available()):
            self.bf16 = is_torch_xla_available()
        self._check_sizes()
        # Pinned memory speeds copies to an accelerator; without one, torch warns at every dataloader it pins nothing
        if self.dataloader_pin_memory and (self.use_cpu or not torch.accelerator.is_available()):
            self.dataloader_pin_memory = False
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise InputError(
                f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}, got {self.loss_type!r}. "
                "Use 'minor_sft' for Minor SFT."
            )
        _check_number("beta", self.beta, positive=True, hint="The paper's best is beta=0.04.")
        _check_number("kl_coef", self.kl_coef, positive=False, hint="The ASFT paper recommends kl_coef=0.05.")
        _check_number("iw_weight_max", self.iw_weight_max, positive=True, hint="The iw-SFT authors use 16.")
        if self.loss_type == "sft_dpo" and self.beta > SFT_DPO_LARGE_BETA:
            logger.warning(
                f"loss_type='sft_dpo' with beta={self.beta:g}: at the start its gradient is beta/2 = "
                f"{self.beta / 2:g} times the gradient of the answer's summed NLL (a sum over its tokens, not a "
                "mean), so the first steps are that much larger than plain SFT's, and once the policy moves the "
                "weights sigmoid(-beta r) fall to 0. The paper's best is beta=0.04."
            )
        self.precompute_ref_log_probs = precompute_choice(self.precompute_ref_log_probs)
        _check_count(
            "ref_top_k",
            self.ref_top_k,
            1,
            "It is the reference's tokens per answer token kept by the precomputed KL anchor (default 64).",
        )
        _check_count(
            "ref_tail_samples",
            self.ref_tail_samples,
            0,
            "It is the tokens drawn per answer token from the reference's rest by the precomputed KL anchor (default "
            "32; 0 draws none).",
        )
        if self.precompute_ref_log_probs is True and not self.uses_reference:
            raise InputError(
                f"precompute_ref_log_probs=True with loss_type={self.loss_type!r} and log_deviation=False: there is "
                "no reference to precompute. Drop precompute_ref_log_probs, or set log_deviation=True."
            )
        if self.neftune_noise_alpha is not None and self.uses_reference:
            raise InputError(
                f"neftune_noise_alpha={self.neftune_noise_alpha} with loss_type={self.loss_type!r}: NEFTune adds "
                "noise to the policy's input embeddings in training forwards only, and the reference scores clean "
                "ones, so log(pi_theta / pi_ref), the weights and `deviation` are noise from the first step. Use "
                "NEFTune with loss_type='nll' (or 'dft'), or drop neftune_noise_alpha."
            )
        self._check_drift_settings()
        self._check_steering()
        self._check_trackers_installed()
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise InputError(f"precompute_ref_batch_size must be >= 1, got {self.precompute_ref_batch_size}.")

    def _check_sizes(self) -> None:
        """Values that transformers accepts and only trips over once training starts (a division by zero, a NaN
        step), after the output directory was made."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _check_count(name, getattr(self, name), 1)
        if (
            not isinstance(self.learning_rate, (int, float))
            or not math.isfinite(self.learning_rate)
            or self.learning_rate < 0
        ):
            raise InputError(
                f"learning_rate must be a finite number >= 0, got {self.learning_rate!r}. The paper's best for Minor "
                "SFT is 2e-5."
            )

    def _check_trackers_installed(self) -> None:
        """`report_to: tensorboard` without TensorBoard installed fails in transformers with a hint to install
        `tensorboardX`, after the model is loaded."""
        if "tensorboard" in (self.report_to or []) and not any(
            importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")
        ):
            raise InputError(
                "report_to includes 'tensorboard', which is not installed: `pip install 'minorsft_trl[tensorboard]'` "
                "(or `pip install tensorboard`), or report to none."
            )

    def _check_drift_settings(self) -> None:
        for name in ("drift_num_prompts", "drift_max_new_tokens", "drift_num_texts"):
            _check_count(name, getattr(self, name), 1)
        if self.max_forward_kl is not None:
            _check_number(
                "max_forward_kl",
                self.max_forward_kl,
                positive=True,
                hint="It is the largest forward KL per token (nats) the run may reach, e.g. 0.5; unset it for no "
                "budget.",
            )
            if not self.eval_drift:
                raise InputError(
                    f"max_forward_kl={self.max_forward_kl} needs the drift measures, but eval_drift=False. Set "
                    "eval_drift=True, or drop max_forward_kl."
                )
            eval_strategy, save_strategy = (getattr(s, "value", s) for s in (self.eval_strategy, self.save_strategy))
            if eval_strategy == "no":
                raise InputError(
                    f"max_forward_kl={self.max_forward_kl} is checked at evaluations, but eval_strategy='no'. Set "
                    "eval_strategy='steps' with eval_steps (and an eval dataset or test_split_size)."
                )
            if save_strategy == "no":
                raise InputError(
                    f"max_forward_kl={self.max_forward_kl} keeps the last checkpoint within budget, but "
                    f"save_strategy='no' saves none. Set save_strategy={eval_strategy!r}, as eval_strategy"
                    + (", with save_steps a multiple of eval_steps." if eval_strategy == "steps" else ".")
                )
            if save_strategy != eval_strategy or (eval_strategy == "steps" and self.save_steps % self.eval_steps != 0):
                raise InputError(
                    f"max_forward_kl keeps the last checkpoint within budget, so checkpoints must be saved at "
                    f"evaluations: save_strategy={self.save_strategy!r}, save_steps={self.save_steps} against "
                    f"eval_strategy={self.eval_strategy!r}, eval_steps={self.eval_steps}. Use the same strategy, "
                    "with save_steps a multiple of eval_steps."
                )

    def _check_steering(self) -> None:
        """`target_forward_kl`: a budget in `eval_forward_kl`'s units, on a loss with a KL anchor to steer."""
        if self.target_forward_kl is None:
            return
        _check_number(
            "target_forward_kl",
            self.target_forward_kl,
            positive=True,
            hint="It is the forward KL per token (nats) the run should end at, e.g. 0.5; unset it to keep kl_coef.",
        )
        if "kl_coef" not in self.loss_settings:
            raise InputError(
                f"target_forward_kl={self.target_forward_kl:g} steers the KL anchor's coefficient, and "
                f"loss_type={self.loss_type!r} has no KL anchor. Use loss_type='sft_kl' (plain SFT plus the anchor) "
                "or 'asft'; or max_forward_kl for a stop at the budget with any loss."
            )
        if self.kl_coef <= 0:
            raise InputError(
                f"target_forward_kl={self.target_forward_kl:g} starts the steered coefficient at kl_coef, which must "
                f"then be > 0, got {self.kl_coef}. Leave kl_coef at its default (0.05), or give the start you expect."
            )
        if not self.eval_drift:
            raise InputError(
                f"target_forward_kl={self.target_forward_kl:g} is calibrated on the drift measures, but "
                "eval_drift=False. Set eval_drift=True, or drop target_forward_kl."
            )
        if getattr(self.eval_strategy, "value", self.eval_strategy) == "no":
            raise InputError(
                f"target_forward_kl={self.target_forward_kl:g} is calibrated at evaluations, but eval_strategy='no'. "
                "Set eval_strategy='steps' with eval_steps (about 10 evaluations per run), and an eval dataset or "
                "test_split_size."
            )
        if self.max_forward_kl is not None and self.max_forward_kl < self.target_forward_kl:
            raise InputError(
                f"max_forward_kl={self.max_forward_kl:g} is below target_forward_kl={self.target_forward_kl:g}: the "
                "run would stop before it reaches the budget it steers to. Set max_forward_kl above it (e.g. 1.1 "
                "times), or drop one of them."
            )

    @property
    def reference_loss(self) -> LossType | None:
        """The declaration of the reference-aware loss (`minorsft_trl.loss_types`), `None` for TRL's own losses."""
        return REFERENCE_LOSSES.get(self.loss_type)

    @property
    def loss_settings(self) -> tuple[str, ...]:
        """The fields the loss reads (`beta` for `minor_sft`, ...); none for TRL's own losses."""
        return self.reference_loss.settings if self.reference_loss is not None else ()

    def describe_loss(self) -> str:
        """The loss and the settings it reads, e.g. `"minor_sft (beta=0.04, lr=2e-05)"`."""
        values = [f"{name}={getattr(self, name)}" for name in self.loss_settings] + [f"lr={self.learning_rate}"]
        if self.target_forward_kl is not None:
            values[values.index(f"kl_coef={self.kl_coef}")] = (
                f"kl_coef steered from {self.kl_coef} to target_forward_kl={self.target_forward_kl}"
            )
        return f"{self.loss_type} ({', '.join(values)})"

    @property
    def mean_over_examples(self) -> bool:
        """Whether the loss is a mean over the examples of the optimizer step (the paper's), not over its tokens."""
        return self.reference_loss is not None and self.reference_loss.mean_over is MeanOver.EXAMPLES

    @property
    def needs_reference_distribution(self) -> bool:
        """Whether the loss reads the reference's next-token distribution (the KL anchor), not only its log-probs."""
        return self.reference_loss is not None and self.reference_loss.reference is ReferenceNeed.DISTRIBUTION

    @property
    def uses_reference(self) -> bool:
        """Whether training runs a reference: for the loss itself, or only to log the deviation."""
        return self.reference_loss is not None or self.log_deviation


class BoolOrAuto:
    """The type of `precompute_ref_log_probs`: `True`, `False` or `"auto"`. As the field's annotation it is also what
    a `TrlParser` built on `MinorSFTConfig` (ours, or one a user writes as TRL's `sft.py` does) parses the command
    line and the YAML strings with: transformers' parser would read `bool | str` as a bool and refuse "auto"."""

    def __new__(cls, value) -> bool | str:
        try:
            return precompute_choice(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error


def precompute_choice(value) -> bool | str:
    """`precompute_ref_log_probs` as `True`, `False` or `"auto"`, from a bool or its spelling on a command line."""
    if isinstance(value, bool):
        return value
    choice = {"true": True, "false": False, "auto": "auto"}.get(str(value).strip().lower())
    if choice is None:
        raise InputError(
            f"precompute_ref_log_probs must be true, false or 'auto', got {value!r}. 'auto' (the default) precomputes "
            "wherever it can serve."
        )
    return choice


def _check_count(name: str, value, minimum: int, hint: str = "") -> None:
    """A whole number of something: an `int` (not a `bool`) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}. {hint}".rstrip())


def _check_number(name: str, value, positive: bool, hint: str) -> None:
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number {bound}, got {value!r} ({type(value).__name__}). {hint}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise InputError(f"{name} must be a finite number {bound}, got {value}. {hint}")


def as_minor_sft_config(args, model) -> MinorSFTConfig:
    """`None`, a plain `TrainingArguments` or an `SFTConfig` become a `MinorSFTConfig` (as `SFTTrainer` does)."""
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        return MinorSFTConfig(f"{model_name.split('/')[-1]}-MinorSFT")
    if isinstance(args, MinorSFTConfig):
        return args
    # Field by field: `to_dict` masks every `*_token` field, `eos_token` and `pad_token` included
    values = {f.name: getattr(args, f.name) for f in fields(args) if f.init}
    if isinstance(args, SFTConfig):
        # An `SFTConfig` always carries a loss type, "nll" by default: kept as is, it would train plain SFT
        sft_loss_type = values.pop("loss_type")
        logger.warning(
            f"MinorSFTTrainer got an `SFTConfig` (loss_type={sft_loss_type!r}, which has no reference): training "
            "Minor SFT with loss_type='minor_sft' and beta=0.04. Pass a `MinorSFTConfig` to choose the loss and beta "
            "(`MinorSFTConfig(loss_type='nll')` trains plain SFT)."
        )
    return MinorSFTConfig(**values)
