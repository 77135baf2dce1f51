"""`MinorSFTTrainer`: TRL's `SFTTrainer` with a reference-aware, per-example loss."""

import functools
import os
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTConfig, SFTTrainer
from trl.models.utils import prepare_deepspeed, prepare_fsdp
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import (
    add_fused_lm_head,
    create_model_from_path,
    get_config_model_id,
    use_adapter,
)

from .checkpoints import (
    check_run_identity,
    has_manifest,
    is_complete,
    last_complete_checkpoint,
    mark_complete,
    write_run_identity,
)
from .config import TRL_LOSS_TYPES, MinorSFTConfig
from .data.sharegpt import sharegpt_to_messages
from .drift.budget import DriftBudgetCallback
from .drift.card import drift_section
from .drift.data import first_conversations
from .drift.live import DriftCallback, DriftMixin, drift_log_history
from .engines import destroy_if_engine, parameter_bytes, runnable_before_training
from .errors import InputError
from .examples import ExampleIndex, PackedRowsApart
from .fused_head import labelled_positions_only
from .loss_types import LossInputs, MeanOver, ReferenceNeed
from .losses import deviation
from .model_card import is_hub_dataset_id, name_saved_adapters_base_model, named_model_card
from .reference.check import ReferenceCheck, deviation_tolerance
from .reference.identity import (
    dataset_fingerprint,
    model_identity,
    module_fingerprint,
    peft_reference_name,
    trained_adapter_settings,
)
from .reference.models import (
    StartingBaseParameters,
    active_dropouts,
    add_reference_adapter,
    check_same_tokenizer,
    check_same_vocabulary,
    disable_dropout,
    freeze,
    frozen_copy,
    quantized_layers_in_train_mode,
    reference_adapter_name,
    reference_mode,
)
from .reference.precompute import REF_LOGPS, PrecomputedReferenceMixin, from_main_process, resolve_precompute
from .reference.vocabulary_kl import (
    answer_hidden_states,
    captured_hidden_states,
    check_plain_logits,
    lm_head_weights,
    reference_head,
    token_kl,
)
from .validation import check_adapter_targets, check_inputs, check_parallelism, is_peft_model_or_path

logger = transformers.utils.logging.get_logger(__name__)

# A `minor_weight` below this everywhere in a logging window leaves gradients of a thousandth: learning has stopped
STALLED_WEIGHT = 1e-3

# What to do when a dataset reaches the reference after `precompute_ref_log_probs=True` released it
RELEASED_REFERENCE_FIX = (
    "Pass every dataset you evaluate to the trainer's `eval_dataset` (a dict for several), or leave "
    "precompute_ref_log_probs at 'auto', which keeps the reference to score datasets passed to `evaluate` later."
)

# Key under which `get_batch_samples` hands `compute_loss` the number of examples of the whole optimizer step
NUM_EXAMPLES_KEY = "num_examples_in_step"


class _FusedForwardRecorder:
    """Calls a model and keeps the outputs of its fused-LM-head forward, so that `SFTTrainer.compute_loss` computes
    its metrics (`entropy`, `mean_token_accuracy`, `num_tokens`, `aux_loss`) from the very forward whose per-token
    log-probs our loss uses; given `unwrapped` (the model without its DDP / FSDP wrapper), also that forward's last
    hidden states (the LM head input)."""

    def __init__(self, model: torch.nn.Module, unwrapped: torch.nn.Module | None = None):
        self.model = model
        self.unwrapped = unwrapped
        self.outputs = None
        self.hidden_states = None

    def __call__(self, *args, **kwargs):
        if not (kwargs.get("fused_lm_head") and self.unwrapped is not None):
            outputs = self.model(*args, **kwargs)
        else:
            with captured_hidden_states(self.unwrapped) as captured:
                outputs = self.model(*args, **kwargs)
            self.hidden_states = captured[-1]
        if kwargs.get("fused_lm_head"):
            self.outputs = outputs
        return outputs


@contextmanager
def _removed_on_error(output_dir: str) -> Iterator[None]:
    """If the block fails, remove `output_dir` when it did not exist before and is still empty."""
    existed = os.path.exists(output_dir)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise


@contextmanager
def _loss_type_seen_by_trl(args: MinorSFTConfig) -> Iterator[None]:
    """`SFTTrainer.__init__` accepts only its own loss types: let it see `"nll"` while it builds."""
    loss_type = args.loss_type
    if loss_type not in TRL_LOSS_TYPES:
        args.loss_type = "nll"
    try:
        yield
    finally:
        args.loss_type = loss_type


class MinorSFTTrainer(DriftMixin, PrecomputedReferenceMixin, SFTTrainer):
    """
    Drop-in replacement for TRL's `SFTTrainer` that brakes the drift from a reference model (Minor SFT, arXiv
    2408.10642). Every argument of `SFTTrainer` keeps its meaning; `args` may be a `MinorSFTConfig`, an `SFTConfig`,
    a plain `TrainingArguments` or `None`.

    With `loss_type="minor_sft"` (the default) each example's gradient is the per-example mean NLL gradient scaled by
    `2 * sigmoid(-beta * log(pi_theta(y|x) / pi_ref(y|x)))`, and the batch loss is the mean over its examples.

    Args:
        ref_model (`str` or `PreTrainedModel`, *optional*):
            The reference. Defaults to `args.ref_model_name_or_path`; if neither is set, a PEFT model is its own
            reference with its adapters disabled (a frozen `"ref"` copy of the adapter when the model arrives with
            one), and full fine-tuning uses a frozen copy of the policy as training starts. Before the first update the
            reference is checked against the policy's starting point (see `minorsft_trl.reference.check`).

    Logged on train and eval, next to TRL's metrics: `deviation` (the paper's m_theta, eq. 8), `log_ratio` (mean of
    `log(pi_theta(y|x) / pi_ref(y|x))`) and, for `minor_sft`, `minor_weight` with `minor_weight_min` and
    `minor_weight_max`. At every evaluation the drift measures (`eval_forward_kl`, `eval_nll_change`; see
    `minorsft_trl.drift.live`), and `eval_answer_nll`, the held-out answers' per-token NLL. The drift measured once
    before training is kept in the trainer state, not as a log entry of its own, so that `state.log_history` keeps the
    shape TRL gives it: `minorsft_trl.drift.live.drift_log_history(trainer.state)` is the log led by it.
    """

    _tag_names = ["trl", "sft", "minor-sft"]
    _name = "Minor SFT"
    _paper = {
        "title": "Minor SFT loss for LLM fine-tune to increase performance and reduce model deviation",
        "id": "2408.10642",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{xie2024minorsft,
                title   = {{Minor SFT loss for LLM fine-tune to increase performance and reduce model deviation}},
                author  = {Shiming Xie and Hong Chen and Fred Yu and Zeye Sun and Xiuyu Wu},
                year    = 2024,
                journal = {arXiv preprint arXiv:2408.10642},
            }"""),
    }

    def __init__(
        self,
        model: "str | PreTrainedModel",
        args: MinorSFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        *,
        ref_model: "str | PreTrainedModel | None" = None,
    ):
        args = _as_minor_sft_config(args, model)
        train_dataset = sharegpt_to_messages(train_dataset, "train_dataset")
        eval_dataset = sharegpt_to_messages(eval_dataset, "eval_dataset")
        self._eval_conversations = first_conversations(eval_dataset, args.drift_num_prompts)
        # The sums and counts of the metrics `log` logs as means over every example or token (`_add_to_mean`)
        self._window_sums = {"train": {}, "eval": {}}
        # Only an explicit True frees a separate reference after the precompute: "auto" keeps it, so that a dataset
        # passed to `evaluate` later (ordinary TRL use) is scored against the same reference
        releases_reference = args.precompute_ref_log_probs is True
        args.precompute_ref_log_probs = resolve_precompute(args, train_dataset, eval_dataset)
        check_inputs(
            args,
            model=model,
            ref_model=ref_model,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        # The per-example losses normalise by the examples of the whole optimizer step, see `get_batch_samples`;
        # the per-token ones reduce like TRL's
        reference_loss = args.reference_loss
        self.loss_is_scaled_for_ga = (
            True if reference_loss is not None and reference_loss.mean_over is MeanOver.EXAMPLES else None
        )
        policy_has_own_adapter = is_peft_model_or_path(model) and peft_config is None
        # `Trainer.__init__` creates the output directory; a failed init leaves nothing behind
        with _removed_on_error(args.output_dir):
            with _loss_type_seen_by_trl(args):
                super().__init__(
                    model,
                    args=args,
                    data_collator=data_collator,
                    train_dataset=train_dataset,
                    eval_dataset=eval_dataset,
                    processing_class=processing_class,
                    compute_loss_func=compute_loss_func,
                    compute_metrics=compute_metrics,
                    callbacks=callbacks,
                    optimizers=optimizers,
                    optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                    preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                    quantization_config=quantization_config,
                    peft_config=peft_config,
                    formatting_func=formatting_func,
                )
            self._check_prepared_dataset(train_dataset)
            if peft_config is not None:
                check_adapter_targets(self.accelerator.unwrap_model(self.model))
            if (
                args.eval_packing
                and not args.packing
                and isinstance(self.data_collator, DataCollatorForLanguageModeling)
                and not self.data_collator.padding_free
            ):
                self.data_collator = PackedRowsApart(self.data_collator)
            self._disable_dropout_if_asked()
            check_parallelism(args, self.accelerator.parallelism_config)
            self._warn_if_launcher_overrides_precision()
            self.ref_model = None
            self._starting_base_parameters = StartingBaseParameters()
            self._reference_released = False
            self._releases_reference = releases_reference
            self._reference_check = None
            self._warned_non_finite_loss = False
            measures_drift = self._drift_enabled()
            explicit_reference = ref_model is not None or args.ref_model_name_or_path is not None
            # Plain SFT measures its drift against the reference it would have: free for a PEFT model (adapters
            # disabled), a named one if given; full fine-tuning keeps no copy (see `minorsft_trl.drift.live`)
            if args.uses_reference or (
                measures_drift and (explicit_reference or is_peft_model(self.accelerator.unwrap_model(self.model)))
            ):
                self.ref_model, self._reference_check = self._load_reference(
                    ref_model, quantization_config, policy_has_own_adapter
                )
            if self._needs_reference_distribution:
                for module in (self.model, self.ref_model):
                    if module is not None:
                        check_plain_logits(self.accelerator.unwrap_model(module), args.loss_type)
            # What the reference is, taken before it is sharded (FSDP, ZeRO-3) or released, and settled by the main
            # process: what a checkpoint of this run belongs to, and the reference part of the precompute cache key
            reference, canonical_name, adapter_config = self._reference_weights()
            self._run_identity = from_main_process(
                {
                    "loss_type": args.loss_type,
                    "model": get_config_model_id(self.accelerator.unwrap_model(self.model).config),
                    "reference": module_fingerprint(reference, canonical_name, sample=1024),
                    "settings": {name: getattr(args, name) for name in args.loss_settings},
                    "adapter": trained_adapter_settings(self.accelerator.unwrap_model(self.model)),
                }
            )
            reference_identity = None
            if args.precompute_ref_log_probs or measures_drift:
                started = time.perf_counter()
                reference_identity = from_main_process(model_identity(reference, canonical_name, adapter_config))
                if not args.precompute_ref_log_probs:  # the drift measures' cache key alone needs it
                    self.drift_seconds += time.perf_counter() - started
            if self.ref_model is not None:
                self.ref_model = self._prepare_reference(self.ref_model)
                held, whole = parameter_bytes(self.accelerator.unwrap_model(self.ref_model))
                logger.info(
                    f"The separate reference holds {held / 2**20:.1f} MiB of weights in this process, of "
                    f"{whole / 2**20:.1f} MiB whole."
                )
            # The reference passes before training: with the policy as the reference, under ZeRO-3, through an engine
            passes_before_training = measures_drift or args.precompute_ref_log_probs
            before_training = (
                runnable_before_training(self.model, self.accelerator)
                if self.ref_model is None and passes_before_training
                else nullcontext()
            )
            with before_training:
                if measures_drift:  # before a separate reference is released by the precompute
                    self._prepare_drift_measures(reference_identity)
                    self.add_callback(DriftCallback(self))
                if args.precompute_ref_log_probs:
                    self._attach_precomputed_reference(reference_identity, releases_reference)
            self._drift_budget = None
            if args.max_forward_kl is not None:
                self._drift_budget = DriftBudgetCallback(self, args.max_forward_kl)
                self.add_callback(self._drift_budget)

    # ------------------------------------------------------------------ reference

    def _load_reference(
        self, ref_model, quantization_config, policy_has_own_adapter: bool
    ) -> tuple[torch.nn.Module | None, ReferenceCheck]:
        """Resolve the reference (see `minorsft_trl.reference.models`): the separate model, not yet prepared
        (`None` when the policy itself is the reference, adapters disabled or its `"ref"` adapter), and what the
        reference check expects of it."""
        ref_model = ref_model if ref_model is not None else self.args.ref_model_name_or_path
        explicit = ref_model is not None
        policy = self.accelerator.unwrap_model(self.model)
        if not explicit and is_peft_model(policy):
            adapter_config = policy.peft_config[policy.active_adapter]
            self._starting_base_parameters = self._keep_starting_base_parameters(policy)
            if policy_has_own_adapter:
                add_reference_adapter(policy)
                return None, ReferenceCheck(
                    f"a frozen copy of the {adapter_config.peft_type.value} adapter {policy.active_adapter!r} being "
                    "re-trained",
                    starts_at_reference=True,
                    hint="Pass the reference you mean as `ref_model`.",
                )
            # Prompt learning adds virtual tokens, and an adapter initialised as a non-identity on purpose changes the
            # outputs: there the policy legitimately starts away from its base model
            identity_init = all(
                getattr(adapter_config, field, True) is not False
                for field in ("init_lora_weights", "init_weights", "init_ia3_weights")
            )
            return None, ReferenceCheck(
                f"the base model with the {adapter_config.peft_type.value} adapters disabled",
                starts_at_reference=identity_init and not adapter_config.is_prompt_learning,
                hint="The base weights seen with the adapters disabled are not those the policy starts from (an "
                "initialisation such as PiSSA, OLoRA or LoftQ rewrites them): pass the original model as `ref_model`.",
            )
        if explicit:
            name = ref_model if isinstance(ref_model, str) else get_config_model_id(ref_model.config) or "a model"
            check = ReferenceCheck(f"the model given as `ref_model` ({name})", starts_at_reference=False, hint="")
        else:
            logger.warning(
                "Full fine-tuning with a reference: a second, frozen copy of the policy is the reference, which "
                "doubles the model memory. Train with a `peft_config` (LoRA/QLoRA) to use the policy with its "
                "adapters disabled instead, or set `precompute_ref_log_probs=True` to free it after one"
                " pass over the data."
            )
            check = ReferenceCheck(
                "a frozen copy of the policy as training starts",
                starts_at_reference=True,
                hint="Pass the reference you mean as `ref_model`.",
            )
            if is_deepspeed_zero3_enabled():
                # ZeRO-3 partitions the weights at load time: a copy would hold empty shards, so load them again
                ref_model = get_config_model_id(policy.config)
                if not ref_model:
                    raise InputError(
                        f"loss_type={self.args.loss_type!r} under DeepSpeed ZeRO-3 loads the reference from the "
                        "policy's path, but this model has none (`config._name_or_path` is empty). Pass `ref_model` "
                        "(a path or a model), or set `precompute_ref_log_probs=True`."
                    )
            else:
                ref_model = frozen_copy(policy)
        if isinstance(ref_model, str):
            check_same_tokenizer(self.processing_class, ref_model)
            init_kwargs = dict(self.args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            if self.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
                init_kwargs["device_map"] = None
            init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            init_kwargs.setdefault("dtype", self.model.dtype)
            ref_model = create_model_from_path(ref_model, **init_kwargs)
        check_same_vocabulary(self.model, ref_model, explicit=explicit)
        freeze(ref_model)
        add_fused_lm_head(ref_model.get_base_model() if is_peft_model(ref_model) else ref_model)
        return ref_model, check

    def _keep_starting_base_parameters(self, policy: torch.nn.Module) -> StartingBaseParameters:
        """The starting values of the base parameters a PEFT policy trains besides its adapters (`bias="all"`), which
        its own reference must not see move. Refused where they are sharded (FSDP, ZeRO-3): kept whole here, they
        could not be put in place of a shard."""
        starting = StartingBaseParameters(policy)
        if not starting:
            return starting
        names = list(starting.parameters)
        if is_deepspeed_zero3_enabled() or self.is_fsdp_enabled:
            raise InputError(
                f"The PEFT adapter trains {len(names)} parameters of the base model besides its own (e.g. "
                f"{names[0]!r}: `bias='all'` or `'lora_only'`), which the base model seen with the adapters disabled "
                "(the reference) must keep at their starting values; under FSDP or ZeRO-3 they are sharded and "
                "cannot be swapped. Set `bias='none'`, or pass the starting model as `ref_model`."
            )
        logger.info(
            f"The PEFT adapter trains {len(names)} parameters of the base model besides its own (e.g. {names[0]!r}): "
            "their starting values are kept aside and put in place for every reference pass, so the reference stays "
            "the model the run started from."
        )
        return starting

    def _prepare_reference(self, ref_model: torch.nn.Module) -> torch.nn.Module:
        """Place (and under FSDP / ZeRO, shard) a separate reference, as TRL's `DPOTrainer` does."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def _reference_weights(self):
        """The module whose weights the reference pass runs, how to name its state-dict entries (`None`: leave out),
        and the configuration of the adapter it runs. For a PEFT policy without a separate reference: its base model
        (plus its frozen `"ref"` adapter, if any), named as in the plain model, so equal weights are equal. Without any
        reference (`nll`): the policy as it starts, which is what a checkpoint of the run continues from."""
        if self.ref_model is not None:
            reference = self.accelerator.unwrap_model(self.ref_model)
            # An explicit PEFT reference runs its active adapter, whose settings (`lora_alpha`) scale its output
            adapter_config = reference.peft_config[reference.active_adapter] if is_peft_model(reference) else None
            return reference, lambda name: name, adapter_config
        model = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(model):
            return model, lambda name: name, None
        ref_adapter = reference_adapter_name(model)
        other_adapters = [name for name in model.peft_config if name != ref_adapter]
        adapter_config = model.peft_config[ref_adapter] if ref_adapter else None
        return model, lambda name: peft_reference_name(name, other_adapters), adapter_config

    @property
    def _needs_reference_distribution(self) -> bool:
        reference_loss = self.args.reference_loss
        return reference_loss is not None and reference_loss.reference is ReferenceNeed.DISTRIBUTION

    def _reference_token_logps(self, inputs: dict[str, Any], hidden_states: bool = False):
        """`(batch, seq_len - 1)` per-token log-probs of the reference on the batch (zero where the label is -100).
        With `hidden_states=True`, also its `(batch, seq_len, hidden)` last hidden states and its LM head's weight and
        bias (read inside the reference's context: disabling the adapters may swap the head)."""
        if self._reference_released:
            raise InputError(
                "The reference model was released after its log-probs were precomputed for the datasets given at "
                f"init (precompute_ref_log_probs=True), and this batch has none. {RELEASED_REFERENCE_FIX}"
            )
        with self._running_reference() as model, labelled_positions_only():
            if not hidden_states:
                return _fused_token_logps(model, inputs)
            with captured_hidden_states(model) as captured:
                token_logps = _fused_token_logps(model, inputs)
            return token_logps, captured[-1], reference_head(model)

    @contextmanager
    def _running_reference(self) -> Iterator[torch.nn.Module]:
        """The reference as a model to call (no gradient, eval mode): the separate reference; or the PEFT policy with
        its adapters disabled (or its `"ref"` adapter) and the base parameters it trains at their starting values
        (`StartingBaseParameters`); or, before training only, the full fine-tuning policy itself (plain SFT's drift
        measures, where the policy as it starts is the reference and no copy is kept)."""
        if self.ref_model is not None:
            model, context = self.accelerator.unwrap_model(self.ref_model), nullcontext()
        else:
            model = self.accelerator.unwrap_model(self.model)
            context = use_adapter(model, reference_adapter_name(model)) if is_peft_model(model) else nullcontext()
        with self._starting_base_parameters.in_place(), reference_mode(model), context:
            yield model

    def _reference_logps(self, inputs: dict[str, Any], index: ExampleIndex) -> torch.Tensor:
        """`(num_examples,)` summed answer log-probs of the reference, by a reference forward on the batch."""
        # Prompt-learning PEFT prepends virtual tokens to the policy's outputs only: align from the right
        return index.sum(self._reference_token_logps(inputs)[:, -index.answer_mask.size(1) :])

    def _reference_distribution(self, inputs: dict[str, Any], index: ExampleIndex):
        """What the KL anchor needs, from one reference forward: the reference's `(num_examples,)` summed answer
        log-probs, `(num_answer_tokens, hidden)` hidden states at the answer positions, and LM head weights."""
        token_logps, hidden_states, head = self._reference_token_logps(inputs, hidden_states=True)
        ref_logps = index.sum(token_logps[:, -index.answer_mask.size(1) :])
        return ref_logps, answer_hidden_states(hidden_states, index.answer_mask), head

    # ------------------------------------------------------------------ precision

    def _autocast_precision(self) -> str:
        """The precision the forward really runs under: accelerate's autocast (which `accelerate launch` may turn on
        while `args.bf16` is False), not what the training arguments say."""
        return self.accelerator.mixed_precision if self.accelerator.native_amp else "no"

    def _half_precision(self) -> bool:
        """Whether either side of the log-ratio computes in half precision: under autocast, or with half-precision
        weights (a bf16 model; or QLoRA's trained parameters, which TRL casts to bf16, e.g. a `modules_to_save` copy
        of the LM head that the policy runs in bf16 where its reference runs the model's float32 head)."""
        if self._autocast_precision() != "no":
            return True
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        return any(
            param.dtype in (torch.bfloat16, torch.float16)
            for model in models
            for param in self.accelerator.unwrap_model(model).parameters()
        )

    # ------------------------------------------------------------------ loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count the examples of the whole optimizer step (all micro-batches, all processes): the per-example
        losses divide by it, so that batch 8 x accumulation 1 == batch 4 x accumulation 2 == 2 processes x batch 4."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        reference_loss = self.args.reference_loss
        if reference_loss is not None and reference_loss.mean_over is MeanOver.EXAMPLES and batch_samples:
            num_examples = sum(
                ExampleIndex.from_batch(batch["labels"], batch.get("position_ids")).num_examples
                for batch in batch_samples
            )
            num_examples = torch.tensor(num_examples, device=device)
            if self.args.world_size > 1:
                # The paper's mean is over the examples of the global batch: count them on every process, whatever
                # `average_tokens_across_devices` says of TRL's token mean
                num_examples = self.accelerator.gather(num_examples).sum()
            for batch in batch_samples:
                batch[NUM_EXAMPLES_KEY] = num_examples
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Where the reference is read, only the answer positions are scored, policy and reference alike (see
        # `fused_head`); plain SFT trains with TRL's forward exactly
        reads_reference = self.args.uses_reference or (not self.model.training and self._measures_drift)
        with labelled_positions_only() if reads_reference else nullcontext():
            result = self._loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if self.model.training and not torch.isfinite(loss.detach()).all():
            self._on_non_finite_loss(loss)
        return result

    def _on_non_finite_loss(self, loss: torch.Tensor) -> None:
        """A NaN or infinite training loss. A loss that reads the reference stops with the step and the likely cause,
        rather than train on and save a broken model: its log-ratios and weights mean nothing from here. TRL's own
        losses (`nll`, `dft`) train on as `SFTTrainer` does (transformers' `logging_nan_inf_filter` even hides the
        NaN from the logged loss), with one warning that names the cause."""
        cause = self._non_finite_loss_cause()
        message = f"The training loss is {loss.item()} at step {self.state.global_step}: {cause}"
        if self.args.reference_loss is not None:
            raise RuntimeError(
                f"{message} Training stops here, before a broken model is saved: loss_type={self.args.loss_type!r} "
                "reads the reference, and its log-ratios, weights and KL mean nothing from here on (TRL's `nll` and "
                "`dft` train on, as SFTTrainer does)."
            )
        if not self._warned_non_finite_loss:
            self._warned_non_finite_loss = True
            logger.warning(
                f"{message} With loss_type={self.args.loss_type!r} training goes on, as SFTTrainer's does, but the "
                "updates from here are likely NaN: check the model before you use it. Said once."
            )

    def _non_finite_loss_cause(self) -> str:
        """Why the training loss is not finite, and the fix: broken weights (at load, or diverged), or the forward."""
        broken = [
            f"{label} {name!r}"
            for label, module in (("policy", self.model), ("reference", self.ref_model))
            if module is not None
            for name, param in self.accelerator.unwrap_model(module).named_parameters()
            if param.is_floating_point() and not torch.isfinite(param).all()
        ]
        if broken:
            return f"{len(broken)} weights hold NaN or inf (e.g. the {broken[0]}): " + (
                "the model was broken when loaded; check the checkpoint (and its dtype: a float16 conversion can "
                "overflow)."
                if self.state.global_step == 0
                else "the updates diverged; lower `learning_rate`, or keep `max_grad_norm` on."
            )
        return (
            "the weights are finite, but the forward is not: a float16 overflow (train in bf16 or float32), or "
            "logits the loss cannot take."
        )

    def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of one micro-batch (see `compute_loss`)."""
        num_examples_in_step = inputs.pop(NUM_EXAMPLES_KEY, None)
        mode = "train" if self.model.training else "eval"
        index = ExampleIndex.from_batch(inputs["labels"], inputs.get("position_ids"))
        # Plain SFT with drift measures runs its reference in evaluation only, for the held-out m_theta
        reference_in_eval = mode == "eval" and self._measures_drift and self._drift_has_live_reference
        if not (self.args.uses_reference or reference_in_eval):
            if mode == "train":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            recorder = _FusedForwardRecorder(model)
            result = super().compute_loss(recorder, inputs, return_outputs, num_items_in_batch)
            token_logps = recorder.outputs.log_probs[:, -index.answer_mask.size(1) :]
            self._log_answer_nll(index.sum(token_logps), index.num_tokens)
            return result

        ref_logps = inputs.pop(REF_LOGPS, None)
        precomputed = ref_logps is not None
        ref_hidden = ref_head = None
        if self._needs_reference_distribution:
            # Reference first: its activations are freed before the policy's graph is built
            ref_logps, ref_hidden, ref_head = self._reference_distribution(inputs, index)
        elif ref_logps is None:
            ref_logps = self._reference_logps(inputs, index)
        elif ref_logps.numel() != index.num_examples:
            raise RuntimeError(
                f"The batch carries {ref_logps.numel()} precomputed reference log-probs for {index.num_examples} "
                "examples: the data changed after the precompute. Recreate the trainer to recompute them."
            )
        if mode == "train" and self._reference_check is not None:
            if self.state.global_step == 0:  # not when resuming: the policy has moved by then
                self._check_reference_at_start(model, inputs, index, ref_logps, precomputed)
            self._reference_check = None
        unwrapped = self.accelerator.unwrap_model(model)
        recorder = _FusedForwardRecorder(model, unwrapped if ref_hidden is not None else None)
        trl_result = super().compute_loss(recorder, inputs, return_outputs, num_items_in_batch)
        token_logps = recorder.outputs.log_probs[:, -index.answer_mask.size(1) :]
        terms = LossInputs(
            policy_logps=index.sum(token_logps),
            ref_logps=ref_logps,
            num_tokens=index.num_tokens,
            token_logps=token_logps[index.answer_mask],
            example_ids=index.example_ids,
            token_kl=None
            if ref_hidden is None
            else token_kl(
                answer_hidden_states(recorder.hidden_states, index.answer_mask),
                lm_head_weights(unwrapped),
                ref_hidden,
                ref_head,
            ),
        )
        self._log_reference_metrics(mode, terms)
        if mode == "eval":
            self._log_answer_nll(terms.policy_logps, terms.num_tokens)
        reference_loss = self.args.reference_loss
        if reference_loss is None:
            return trl_result

        values = reference_loss.loss(terms, self.args)
        if reference_loss.mean_over is MeanOver.EXAMPLES:
            loss, step_count = self._mean_over_examples(values, num_examples_in_step), num_examples_in_step
        else:
            loss, step_count = self._mean_over_tokens(values, num_items_in_batch), num_items_in_batch
        if self.aux_loss_enabled:
            # As in `SFTTrainer.compute_loss`: a per-micro-batch mean, averaged over the accumulation steps
            steps = self.current_gradient_accumulation_steps if step_count is not None else 1
            loss = loss + self.router_aux_loss_coef * recorder.outputs.aux_loss / steps
        return (loss, trl_result[1]) if return_outputs else loss

    def _check_reference_at_start(
        self, model, inputs: dict[str, Any], index: ExampleIndex, ref_logps: torch.Tensor, precomputed: bool
    ) -> None:
        """Before the first update, compare the policy in reference mode with the reference on this batch (all
        processes), and stop if a reference that must equal the policy's starting point does not (`ReferenceCheck`).
        `precomputed`: whether `ref_logps` come from the precompute pass (other batches: layout noise)."""
        start = time.perf_counter()
        per_token = self._start_log_ratios(model, inputs, index, ref_logps)
        local = torch.stack(
            [
                per_token.abs().max() if per_token.numel() else per_token.new_tensor(0.0),
                per_token.sum(),
                per_token.new_tensor(float(per_token.numel())),
            ]
        )
        stats = self.accelerator.gather(local[None]).view(-1, 3)
        max_abs, total, count = stats[:, 0].max().item(), stats[:, 1].sum().item(), stats[:, 2].sum().item()
        tolerance = deviation_tolerance(self._half_precision(), same_batch=not precomputed)
        self._reference_check.verify(max_abs, total / max(count, 1), tolerance)
        logger.info(f"The reference check took {time.perf_counter() - start:.3f} s.")

    def _start_log_ratios(
        self, model, inputs: dict[str, Any], index: ExampleIndex, ref_logps: torch.Tensor
    ) -> torch.Tensor:
        """`(num_examples,)` log-ratios per answer token of the policy in reference mode (no dropout) against the
        reference's `ref_logps` on this batch."""
        policy = self.accelerator.unwrap_model(model)
        with reference_mode(policy):
            policy_logps = index.sum(_fused_token_logps(policy, inputs)[:, -index.answer_mask.size(1) :])
        return (policy_logps - ref_logps) / index.num_tokens

    def _mean_over_examples(self, per_example: torch.Tensor, num_examples_in_step: torch.Tensor | None):
        """Sum of this micro-batch's per-example losses over the examples of the optimizer step (training), or over
        the examples of this micro-batch (evaluation). A batch without examples gives a finite zero."""
        if num_examples_in_step is None:
            return per_example.sum() / max(per_example.numel(), 1)
        loss = per_example.sum() / num_examples_in_step.clamp(min=1)
        if self.args.world_size > 1:
            # The count spans every process and DDP averages the gradients across processes
            loss = loss * self.accelerator.num_processes
        return loss

    def _mean_over_tokens(self, per_token: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """Sum of this micro-batch's per-token losses over the answer tokens of the optimizer step, reduced exactly as
        `SFTTrainer.compute_loss` reduces `nll` and `dft` (so `asft` is TRL's `dft` wherever its KL is 0)."""
        num_tokens = per_token.numel() if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    # ------------------------------------------------------------------ metrics

    def _log_reference_metrics(self, mode: str, terms: LossInputs) -> None:
        """Append this micro-batch's `deviation` and `log_ratio`, the loss's per-example weights (mean, `_min`, `_max`,
        e.g. `minor_weight`) and the mean per-token KL anchor (`kl`), over all processes, to the metrics that `log`
        averages."""
        log_ratio, num_tokens = terms.policy_logps.detach() - terms.ref_logps, terms.num_tokens
        reference_loss = self.args.reference_loss
        weight_name = reference_loss.weight_name if reference_loss is not None else None
        weight = reference_loss.weight(log_ratio, num_tokens, self.args) if weight_name else torch.ones_like(log_ratio)
        kl = terms.token_kl.detach() if terms.token_kl is not None else log_ratio.new_zeros(0)
        local = torch.stack(
            [
                log_ratio.new_tensor(float(log_ratio.numel())),
                deviation(log_ratio, num_tokens).sum(),
                log_ratio.sum(),
                weight.sum(),
                kl.new_tensor(float(kl.numel())),
                kl.sum(),
                weight.min() if weight.numel() else log_ratio.new_tensor(float("inf")),
                weight.max() if weight.numel() else log_ratio.new_tensor(float("-inf")),
            ]
        )
        stats = self.accelerator.gather(local[None]).view(-1, local.numel())
        sums, weight_min, weight_max = stats[:, :6].sum(0), stats[:, 6].min(), stats[:, 7].max()
        # One device-to-host copy per micro-batch
        total, deviation_sum, log_ratio_sum, weight_sum, kl_count, kl_sum, weight_min, weight_max = torch.cat(
            [sums, weight_min[None], weight_max[None]]
        ).tolist()
        self._add_to_mean(mode, "kl", kl_sum, kl_count)
        if total == 0:
            return
        self._add_to_mean(mode, "deviation", deviation_sum, total)
        self._add_to_mean(mode, "log_ratio", log_ratio_sum, total)
        if weight_name:
            self._add_to_mean(mode, weight_name, weight_sum, total)
            metrics = self._metrics[mode]
            metrics[f"{weight_name}_min"].append(weight_min)
            metrics[f"{weight_name}_max"].append(weight_max)

    def _add_to_mean(self, mode: str, key: str, total: float, count: float) -> None:
        """Add a micro-batch's sum and count of `key` (over examples or tokens) to the logging window's, so that `log`
        logs the mean over every example (token) of the window, not a mean of micro-batch means, which would weigh a
        micro-batch of 3 examples as one of 5 (packing, a last short batch)."""
        if count:
            sums = self._window_sums[mode].setdefault(key, [0.0, 0.0])
            sums[0] += total
            sums[1] += count

    def _log_answer_nll(self, policy_logps: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Add this evaluation micro-batch's NLL of the answers and their count, over all processes, to `answer_nll`,
        the per-token NLL of the held-out answers: the held-out fit of every loss type on one scale (`eval_loss` is
        each loss's own value)."""
        local = torch.stack([-policy_logps.detach().sum(), num_tokens.sum().to(policy_logps.dtype)]).float()
        nll_sum, count = self.accelerator.gather(local[None]).view(-1, 2).sum(0).tolist()
        self._add_to_mean("eval", "answer_nll", nll_sum, count)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`SFTTrainer.evaluate`, with the drift measures among TRL's eval metrics (`SFTTrainer.log` logs them as
        `eval_*`, returned and passed to the callbacks with the others). Measured once per evaluation: a dict of eval
        datasets is evaluated with the prefixes `eval_<name>`, which do not measure again."""
        self._check_reference_for(eval_dataset)
        if self._measures_drift and metric_key_prefix == "eval":
            for key, value in self._drift_metrics().items():
                self._metrics["eval"][key].append(value)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def _check_reference_for(self, eval_dataset) -> None:
        """Stop before evaluating datasets whose reference log-probs were not precomputed, where the reference model
        that would score them was released (`precompute_ref_log_probs=True`). A name selects a dataset given at
        init."""
        if not self._reference_released or eval_dataset is None or isinstance(eval_dataset, str):
            return
        datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        missing = [name for name, dataset in datasets.items() if REF_LOGPS not in (dataset.column_names or [])]
        if missing:
            raise InputError(
                f"evaluate(eval_dataset=...): the reference log-probs of {', '.join(map(repr, missing))} were not "
                "precomputed, and precompute_ref_log_probs=True released the reference model that would score them. "
                f"{RELEASED_REFERENCE_FIX}"
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # `SFTTrainer.log` averages each metric over the logging window; the extremes take their min and max instead
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        for key, (total, count) in self._window_sums[mode].items():
            metrics[key] = [total / count]
        self._window_sums[mode].clear()
        reference_loss = self.args.reference_loss
        weight_name = reference_loss.weight_name if reference_loss is not None else None
        if weight_name:
            for key, reduce in ((f"{weight_name}_min", min), (f"{weight_name}_max", max)):
                if metrics.get(key):
                    metrics[key] = [reduce(metrics[key])]
        largest = metrics.get(f"{weight_name}_max") if weight_name else None
        if mode == "train" and largest and reference_loss.brakes and largest[0] < STALLED_WEIGHT:
            log_ratio = sum(metrics["log_ratio"]) / len(metrics["log_ratio"])
            logger.warning(
                f"Every {self.args.loss_type} weight (`{weight_name}`) of the last logging window is below "
                f"{STALLED_WEIGHT:g} (largest {largest[0]:.3g}, mean log-ratio {log_ratio:.3g}): the brake has "
                f"stopped learning. beta={self.args.beta:g} is too large for these log-ratios; lower it (the paper's "
                "best is 0.04)."
            )
        super().log(logs, start_time)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, titled by the output directory's name unless `model_name` is given, with the base model
        and the data named as what they are (`minorsft_trl.model_card`) and the drift the run reached
        (`minorsft_trl.drift.card`)."""
        model_name = model_name or os.path.basename(os.path.normpath(self.args.output_dir))
        hub_dataset = dataset_name if is_hub_dataset_id(dataset_name) else None
        super().create_model_card(model_name=model_name, dataset_name=hub_dataset, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        model_path = get_config_model_id(self.accelerator.unwrap_model(self.model).config)
        card = named_model_card(Path(path).read_text(), model_path, dataset_name, self.args.output_dir)
        section = drift_section(drift_log_history(self.state), self._drift_budget)
        Path(path).write_text(card + ("\n\n" + section if section is not None else ""))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """`Trainer._save`, with the saved adapter naming its base model by its Hub id (`minorsft_trl.model_card`)."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            name_saved_adapters_base_model(output_dir or self.args.output_dir)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation forwards in eval mode without grad: keep 4-bit layers on their training kernels, see
        # `quantized_layers_in_train_mode` (stock `SFTTrainer.evaluate` breaks the next training step on some CPUs)
        with quantized_layers_in_train_mode(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def end(self):
        """`Trainer.end` (finish the trackers, destroy the process group) once every process is done and the engines
        are let go (`_release_engines`)."""
        self.accelerator.wait_for_everyone()
        self._release_engines()
        super().end()

    def _release_engines(self):
        """Let go of what holds the process group: the DDP wrapper (its reducer) and the DeepSpeed engines of the
        policy and of a separate reference (their hooks, their optimizer's pending collectives). Whatever still holds
        the group when it is destroyed is freed only at interpreter exit, where joining gloo's threads hung a process
        after a successful run (torch 2.13). The trainer cannot train after this."""
        self.model_wrapped = self.model
        destroy_if_engine(self.ref_model)
        if getattr(self.accelerator, "deepspeed_engine_wrapped", None) is not None:
            destroy_if_engine(self.accelerator.deepspeed_engine_wrapped.engine)
            self.accelerator.deepspeed_engine_wrapped = None  # destroyed: not again by `free_memory`
        self.accelerator.free_memory()

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model, trial):
        """`Trainer._save_checkpoint`, then mark the checkpoint complete once every process has written its part
        (sharded FSDP / ZeRO saves write from all ranks), and only then delete old checkpoints (`save_total_limit`):
        a run killed at any point keeps a complete checkpoint it had before."""
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_run_identity(checkpoint, self._checkpoint_identity)
            mark_complete(checkpoint)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    @functools.cached_property
    def _checkpoint_identity(self) -> dict:
        """What a checkpoint of this run belongs to: the run identity taken at init, and a content hash of the
        tokenised training data, hashed only once a checkpoint is written or resumed (0.8 s per 100k examples of 512
        tokens: not for runs that save none)."""
        return {**self._run_identity, "data": dataset_fingerprint(self.train_dataset)}

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints: `resume_from_checkpoint=True` (or `"true"`,
        `"latest"`, as a recipe passes it) takes the last checkpoint whose files were all written."""
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "latest"):
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise InputError(
                    f"resume_from_checkpoint: there is no complete checkpoint in {self.args.output_dir!r}. Drop "
                    "`resume_from_checkpoint` to start from scratch, or pass the path of a checkpoint."
                )
        elif (
            isinstance(resume_from_checkpoint, str)
            and has_manifest(resume_from_checkpoint)
            and not is_complete(resume_from_checkpoint)
        ):
            raise InputError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} is incomplete (killed while saving, or files "
                f"removed since). The last complete one is {last_complete_checkpoint(self.args.output_dir)!r}."
            )
        if isinstance(resume_from_checkpoint, str):
            check_run_identity(resume_from_checkpoint, self._checkpoint_identity)
        # The drift budget's first candidate result: the checkpoint resumed from (else the starting model it saves)
        self._resumed_from_checkpoint = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self._drift_budget is not None and self._drift_budget.exceeded is not None:
            self._load_last_within_budget()
        return output

    def _load_last_within_budget(self) -> None:
        """`load_best_model_at_end`'s loader on the last checkpoint within the drift budget, recorded in the state as
        that loader records the best model: `trainer_state.json` then names the step of the weights the trainer holds
        (`best_global_step`), `global_step` the steps it trained."""
        budget = self._drift_budget
        checkpoint = budget.within_budget_checkpoint
        if not os.path.isdir(checkpoint) or (has_manifest(checkpoint) and not is_complete(checkpoint)):
            # Transformers' loader would only warn and keep the weights over budget
            raise RuntimeError(
                f"The drift budget was exceeded at step {budget.exceeded[0]}, and the last checkpoint within it, "
                f"{checkpoint}, is missing or incomplete (removed since it was saved): the model in memory is over "
                "budget and is not a result. Keep that checkpoint until training ends, and run again."
            )
        self.state.best_model_checkpoint = budget.within_budget_checkpoint
        self.state.best_global_step = budget.within_budget_step
        self._load_best_model()
        start = " (the model the run started from)" if budget.within_budget_step == 0 else ""
        logger.warning(
            f"Loaded {budget.within_budget_checkpoint}{start}, the last checkpoint within the drift budget: the "
            f"weights are those of step {budget.within_budget_step}."
        )

    # ------------------------------------------------------------------ checks

    def _warn_if_launcher_overrides_precision(self) -> None:
        """`accelerate launch` with `mixed_precision: bf16` trains under autocast even when the arguments say
        `bf16: false`: say so, since the precision that runs is not the one the recipe shows. And a mixed precision
        the device has no autocast for (fp16 on a CPU) is ignored by accelerate: say that too."""
        launched = self.accelerator.mixed_precision
        requested = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "no"
        if launched != "no" and self._autocast_precision() == "no":
            logger.warning(
                f"mixed_precision={launched!r} (from the accelerate config, `--mixed_precision` or the training "
                f"arguments) is ignored on this device ({self.accelerator.device.type}: accelerate has no {launched} "
                f"autocast for it): training runs in {str(self.model.dtype).removeprefix('torch.')}. Use "
                "`--mixed_precision bf16`, or `no` to say what runs."
            )
        elif launched != requested:
            logger.warning(
                f"The accelerate config (or `--mixed_precision`) sets mixed_precision={launched!r}, which overrides "
                f"the training arguments (bf16={self.args.bf16}, fp16={self.args.fp16}): training and the reference "
                f"run under {launched} autocast. Set `mixed_precision: {requested}` in the accelerate config (or pass "
                f"`--mixed_precision {requested}` to `accelerate launch`) to train as the recipe says."
            )

    def _disable_dropout_if_asked(self) -> None:
        """`disable_dropout` (see `MinorSFTConfig`): where training reads the reference, dropout would make the
        policy's log-probs differ from the reference's at the first step; say what was switched off, or warn."""
        if not self.args.uses_reference:
            return
        policy = self.accelerator.unwrap_model(self.model)
        if self.args.disable_dropout:
            switched = disable_dropout(policy)
            if switched:
                logger.info(
                    f"disable_dropout=True: set {len(switched)} dropouts of the policy to 0 (e.g. {switched[0]!r}), "
                    "so the policy's training forward gives the reference's log-probs at the start."
                )
            return
        active = active_dropouts(policy)
        if active:
            logger.warning(
                f"disable_dropout=False with {len(active)} active dropouts (e.g. {active[0]!r}): the policy's "
                "log-probs come from training forwards with dropout and the reference's without, so the log-ratio, "
                f"the {self.args.loss_type} weights and `deviation` carry dropout noise from the first step."
            )

    def _check_prepared_dataset(self, train_dataset) -> None:
        """TRL drops the examples that truncation leaves without answer tokens: say so, and stop if none is left."""
        if not isinstance(train_dataset, Dataset) or self._skip_prepare_dataset or self.args.packing:
            return
        num_dropped = len(train_dataset) - len(self.train_dataset)
        if len(self.train_dataset) == 0:
            raise InputError(
                f"All {len(train_dataset)} training examples lost their answer tokens to truncation at "
                f"max_length={self.args.max_length}: nothing is left to train on. Raise `max_length` (or set it to "
                "None), or shorten the prompts."
            )
        if num_dropped:
            logger.warning(
                f"{num_dropped} of {len(train_dataset)} training examples lost all their answer tokens to truncation "
                f"at max_length={self.args.max_length} and were dropped. Raise `max_length` to keep them."
            )


def _fused_token_logps(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """`(batch, seq_len - 1)` per-token log-probs from the fused LM head, without the policy-only forward options."""
    inputs = {k: v for k, v in inputs.items() if k not in ("output_router_logits", "use_cache")}
    return model(**inputs, use_cache=False, fused_lm_head=True).log_probs


def _as_minor_sft_config(args, model) -> MinorSFTConfig:
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
