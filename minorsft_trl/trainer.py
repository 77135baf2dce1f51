"""`MinorSFTTrainer`: TRL's `SFTTrainer` with a reference-aware, per-example loss.

The trainer is glue: the reference is one object (`reference.Reference`), the losses are pure functions declared in
`loss_types`, their reduction over the optimizer step is `reduction`, the logged metrics are `metrics`, the drift
measures `drift.live`, the budget `drift.budget` and the one that steers `kl_coef` `drift.steering`; the precompute
is `reference.precompute`.
"""

import functools
import os
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import transformers
from datasets import Dataset
from transformers import PreTrainedModel, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTTrainer
from trl.trainer.utils import get_config_model_id

from .checkpoints import check_run_identity, complete_and_rotate, resolve_resume
from .config import TRL_LOSS_TYPES, MinorSFTConfig, as_minor_sft_config
from .data.sharegpt import sharegpt_to_messages
from .drift.budget import DriftBudgetCallback
from .drift.card import drift_section
from .drift.data import first_conversations
from .drift.live import DriftCallback, DriftMeasures, drift_log_history
from .drift.steering import CALIBRATION_KEY, COEF_KEY, KLCoefController
from .engines import release_engines, runnable_before_training
from .examples import ExampleIndex, PackedRowsApart
from .fused_head import FusedForwardRecorder, labelled_positions_only
from .loss_types import LossInputs
from .metrics import WindowMetrics
from .model_card import is_hub_dataset_id, name_saved_adapters_base_model, rewrite_model_card
from .non_finite import NonFiniteLoss
from .precision import half_precision, warn_if_launcher_overrides_precision
from .reduction import NUM_EXAMPLES_KEY, count_examples_in_step, mean_over_examples, mean_over_tokens
from .reference.identity import dataset_fingerprint, model_identity, run_identity
from .reference.models import disable_dropout_if_asked, quantized_layers_in_train_mode
from .reference.precompute import REF_LOGPS, ReferencePrecompute, from_main_process, resolve_precompute
from .reference.reference import Reference
from .reference.topk_cache import REF_TOPK_ROW
from .reference.vocabulary_kl import answer_hidden_states, check_plain_logits, lm_head_weights
from .validation import (
    check_adapter_targets,
    check_inputs,
    check_parallelism,
    check_prepared_dataset,
    is_peft_model_or_path,
)

logger = transformers.utils.logging.get_logger(__name__)


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


# The paper, as TRL's trainers name theirs in the model card
PAPER = {
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


class MinorSFTTrainer(SFTTrainer):
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
            `trainer.reference` is the run's `minorsft_trl.reference.Reference`, `trainer.ref_model` its separate
            model, if any.

    Logged on train and eval, next to TRL's metrics: `deviation` (the paper's m_theta, eq. 8), `log_ratio` (mean of
    `log(pi_theta(y|x) / pi_ref(y|x))`) and, for `minor_sft`, `minor_weight` with `minor_weight_min` and
    `minor_weight_max`. At every evaluation the drift measures (`eval_forward_kl`, `eval_nll_change`; see
    `minorsft_trl.drift.live`, `trainer.drift`), and `eval_answer_nll`, the held-out answers' per-token NLL. The
    drift measured once before training is kept in the trainer state, not as a log entry of its own, so that
    `state.log_history` keeps the shape TRL gives it: `minorsft_trl.drift.live.drift_log_history(trainer.state)` is
    the log led by it.
    """

    _tag_names = ["trl", "sft", "minor-sft"]
    _name = "Minor SFT"
    _paper = PAPER

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
        args = as_minor_sft_config(args, model)
        train_dataset = sharegpt_to_messages(train_dataset, "train_dataset")
        eval_dataset = sharegpt_to_messages(eval_dataset, "eval_dataset")
        eval_conversations = first_conversations(eval_dataset, args.drift_num_prompts)
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
        self.loss_is_scaled_for_ga = True if args.mean_over_examples else None
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
            self._check_what_trl_built(train_dataset, peft_config)
            self.window_metrics = WindowMetrics(self._metrics, self.accelerator, args)
            self.non_finite_loss = NonFiniteLoss()
            self.drift = DriftMeasures(self, eval_conversations)
            steers = args.target_forward_kl is not None
            self.kl_steering = KLCoefController(args.target_forward_kl, args.kl_coef) if steers else None
            measures_drift = DriftMeasures.wanted(args, self.eval_dataset)
            self.reference = Reference.load(
                ref_model,
                args=args,
                policy=lambda: self.accelerator.unwrap_model(self.model),
                accelerator=self.accelerator,
                processing_class=self.processing_class,
                quantization_config=quantization_config,
                measures_drift=measures_drift,
                policy_has_own_adapter=policy_has_own_adapter,
                sharded=is_deepspeed_zero3_enabled() or self.is_fsdp_enabled,
                releases_after_precompute=releases_reference,
            )
            if self.args.needs_reference_distribution:
                for module in (self.accelerator.unwrap_model(self.model), *self.reference.modules):
                    check_plain_logits(module, args.loss_type)
            reference_identity = self._take_identities(measures_drift)
            self.reference.prepare(self.is_deepspeed_enabled, self.is_fsdp_enabled)
            self._pass_reference_before_training(measures_drift, reference_identity)
            self._drift_budget = None
            if args.max_forward_kl is not None:
                self._drift_budget = DriftBudgetCallback(self, args.max_forward_kl)
                self.add_callback(self._drift_budget)
            if self.kl_steering is not None:
                self.add_callback(self.kl_steering)

    # ------------------------------------------------------------------ the steps of __init__

    def _check_what_trl_built(self, train_dataset, peft_config) -> None:
        """After `SFTTrainer.__init__`: the examples truncation dropped, the adapter's targets, the eval collator,
        dropout, the parallelism and the precision that will really run."""
        if isinstance(train_dataset, Dataset) and not self._skip_prepare_dataset and not self.args.packing:
            check_prepared_dataset(train_dataset, self.train_dataset, self.args.max_length)
        if peft_config is not None:
            check_adapter_targets(self.accelerator.unwrap_model(self.model))
        self.data_collator = PackedRowsApart.where_needed(self.args, self.data_collator)
        disable_dropout_if_asked(self.args, self.accelerator.unwrap_model(self.model))
        check_parallelism(self.args, self.accelerator.parallelism_config)
        warn_if_launcher_overrides_precision(self.args, self.accelerator, self.model.dtype)

    def _take_identities(self, measures_drift: bool) -> dict | None:
        """What the reference is, taken before it is sharded (FSDP, ZeRO-3) or released, and settled by the main
        process: the run identity (what a checkpoint of this run belongs to) and, where the precompute or the drift
        measures cache something, the reference's identity (their cache key), which is returned."""
        args, weights = self.args, self.reference.weights()
        self._run_identity = from_main_process(run_identity(args, self.accelerator.unwrap_model(self.model), weights))
        if not (args.precompute_ref_log_probs or measures_drift):
            return None
        started = time.perf_counter()
        reference_identity = from_main_process(model_identity(*weights))
        if not args.precompute_ref_log_probs:  # the drift measures' cache key alone needs it
            self.drift.seconds += time.perf_counter() - started
        return reference_identity

    def _pass_reference_before_training(self, measures_drift: bool, reference_identity: dict | None) -> None:
        """The reference's passes before training (the drift measures' samples, the precompute), through an engine
        where the policy is the reference under ZeRO-3; the drift measures first, before the precompute may release
        a separate reference."""
        passes = measures_drift or self.args.precompute_ref_log_probs
        before_training = (
            runnable_before_training(self.model, self.accelerator)
            if self.reference.model is None and passes
            else nullcontext()
        )
        with before_training:
            if measures_drift:
                self.drift.prepare(reference_identity)
                self.add_callback(DriftCallback(self.drift))
            if self.args.precompute_ref_log_probs:
                ReferencePrecompute(self, reference_identity).attach()

    @property
    def kl_coef(self) -> float:
        """The KL anchor's coefficient of this step: `args.kl_coef`, or the one `target_forward_kl` steers to
        (`trainer.kl_steering`, a `minorsft_trl.drift.steering.KLCoefController`)."""
        return self.kl_steering.coef if self.kl_steering is not None else self.args.kl_coef

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The separate reference model (prepared for the engine), as TRL's `DPOTrainer` names it; `None` where the
        policy is its own reference (adapters disabled, the `"ref"` adapter) or once released."""
        return self.reference.model

    # ------------------------------------------------------------------ loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also count the examples of the whole optimizer step (all micro-batches, all processes): the per-example
        losses divide by it, so that batch 8 x accumulation 1 == batch 4 x accumulation 2 == 2 processes x batch 4."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.mean_over_examples and batch_samples:
            count_examples_in_step(batch_samples, device, self.accelerator, self.args.world_size)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Where the reference is read, only the answer positions are scored, policy and reference alike (see
        # `fused_head`); plain SFT trains with TRL's forward exactly
        reads_reference = self.args.uses_reference or (not self.model.training and self.drift.on)
        with labelled_positions_only() if reads_reference else nullcontext():
            result = self._loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if self.model.training and not torch.isfinite(loss.detach()).all():
            policy = self.accelerator.unwrap_model(self.model)
            self.non_finite_loss.handle(loss, self.state.global_step, self.args, policy, self.reference)
        return result

    def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of one micro-batch (see `compute_loss`)."""
        num_examples_in_step = inputs.pop(NUM_EXAMPLES_KEY, None)
        mode = "train" if self.model.training else "eval"
        index = ExampleIndex.from_batch(inputs["labels"], inputs.get("position_ids"))
        # Plain SFT with drift measures runs its reference in evaluation only, for the held-out m_theta
        reference_in_eval = mode == "eval" and self.drift.on and self.reference.is_live
        if not (self.args.uses_reference or reference_in_eval):
            if mode == "train":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            recorder = FusedForwardRecorder(model)
            result = super().compute_loss(recorder, inputs, return_outputs, num_items_in_batch)
            token_logps = recorder.outputs.log_probs[:, -index.answer_mask.size(1) :]
            self.window_metrics.add_answer_nll(index.sum(token_logps), index.num_tokens)
            return result

        side = self.reference.loss_side(inputs, index, distribution=self.args.needs_reference_distribution)
        if mode == "train" and self.reference.check is not None:  # before the first update only, not on resume
            if self.state.global_step == 0:
                half = half_precision(self.accelerator, self.model, self.reference)
                precomputed = side.precomputed
                self.reference.check_at_start(model, inputs, index, side.logps, precomputed=precomputed, half=half)
            self.reference.check = None
        answer_ids = inputs["labels"][:, 1:][index.answer_mask] if side.topk is not None else None
        unwrapped = self.accelerator.unwrap_model(model)
        recorder = FusedForwardRecorder(model, unwrapped if side.reads_distribution else None)
        trl_result = super().compute_loss(recorder, inputs, return_outputs, num_items_in_batch)
        token_logps = recorder.outputs.log_probs[:, -index.answer_mask.size(1) :]
        kl = None
        if side.reads_distribution:
            policy_hidden = answer_hidden_states(recorder.hidden_states, index.answer_mask)
            kl = side.kl_anchor(policy_hidden, lm_head_weights(unwrapped), answer_ids, token_logps[index.answer_mask])
        terms = LossInputs.of(index, token_logps, side.logps, kl)
        anchor = (side.topk.ids.size(1), side.topk.tail_samples) if side.topk is not None else None
        kl_sum, kl_count = self.window_metrics.add_reference_terms(mode, terms, anchor)
        if self.kl_steering is not None and mode == "train":
            self.kl_steering.add(kl_sum, kl_count)
            self._metrics["train"][COEF_KEY].append(self.kl_coef)
            if self.kl_steering.calibration is not None:
                self._metrics["train"][CALIBRATION_KEY].append(self.kl_steering.calibration)
        if mode == "eval":
            self.window_metrics.add_answer_nll(terms.policy_logps, terms.num_tokens)
        reference_loss = self.args.reference_loss
        if reference_loss is None:
            return trl_result

        values = reference_loss.loss(terms, self.args, self.kl_coef)
        if self.args.mean_over_examples:
            loss = mean_over_examples(values, num_examples_in_step, self.accelerator.num_processes)
            step_count = num_examples_in_step
        else:
            token_scale = self.accelerator.num_processes // self.get_tp_size()
            loss = mean_over_tokens(
                values, num_items_in_batch, token_scale if self.args.average_tokens_across_devices else 1
            )
            step_count = num_items_in_batch
        if self.aux_loss_enabled:
            # As in `SFTTrainer.compute_loss`: a per-micro-batch mean, averaged over the accumulation steps
            steps = self.current_gradient_accumulation_steps if step_count is not None else 1
            loss = loss + self.router_aux_loss_coef * recorder.outputs.aux_loss / steps
        return (loss, trl_result[1]) if return_outputs else loss

    # ------------------------------------------------------------------ evaluation, logs, card

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`SFTTrainer.evaluate`, with the drift measures among TRL's eval metrics (`SFTTrainer.log` logs them as
        `eval_*`, returned and passed to the callbacks with the others). Measured once per evaluation: a dict of eval
        datasets is evaluated with the prefixes `eval_<name>`, which do not measure again."""
        self.reference.check_can_score(eval_dataset)
        if self.drift.on and metric_key_prefix == "eval":
            for key, value in self.drift.metrics().items():
                self._metrics["eval"][key].append(value)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # `SFTTrainer.log` averages each metric over the logging window: ours are means over its examples already
        self.window_metrics.close_window("train" if self.model.training else "eval")
        super().log(logs, start_time)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, titled by the output directory's name unless `model_name` is given, with the base model
        and the data named as what they are (`minorsft_trl.model_card`) and the drift the run reached
        (`minorsft_trl.drift.card`)."""
        model_name = model_name or os.path.basename(os.path.normpath(self.args.output_dir))
        hub_dataset = dataset_name if is_hub_dataset_id(dataset_name) else None
        super().create_model_card(model_name=model_name, dataset_name=hub_dataset, tags=tags)
        if self.is_world_process_zero():
            model_path = get_config_model_id(self.accelerator.unwrap_model(self.model).config)
            drift = drift_section(drift_log_history(self.state), self._drift_budget, self.kl_steering)
            rewrite_model_card(self.args.output_dir, model_path, dataset_name, drift)

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

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.precompute_ref_log_probs:
            added = [name for name in (REF_LOGPS, REF_TOPK_ROW) if name not in self._signature_columns]
            self._signature_columns.extend(added)

    # ------------------------------------------------------------------ training, checkpoints, the end

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints of this run (`checkpoints.resolve_resume`), and
        ending within the drift budget where one is set."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if isinstance(resume_from_checkpoint, str):
            check_run_identity(resume_from_checkpoint, self._checkpoint_identity)
        # The drift budget's first candidate result: the checkpoint resumed from (else the starting model it saves)
        self._resumed_from_checkpoint = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self._drift_budget is not None and self._drift_budget.exceeded is not None:
            self._drift_budget.restore_within_budget()
        return output

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
            complete_and_rotate(run_dir, self.state, self._checkpoint_identity, save_total_limit)

    @functools.cached_property
    def _checkpoint_identity(self) -> dict:
        """What a checkpoint of this run belongs to: the run identity taken at init, and a content hash of the
        tokenised training data, hashed only once a checkpoint is written or resumed (0.8 s per 100k examples of 512
        tokens: not for runs that save none)."""
        return {**self._run_identity, "data": dataset_fingerprint(self.train_dataset)}

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
        self.reference.destroy_engine()
        release_engines(self.accelerator)
