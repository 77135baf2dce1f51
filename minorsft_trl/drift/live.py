"""The drift measures of a training run: what the reference gives once, before training, and what each evaluation
logs next to TRL's metrics.

Once (`DriftMeasures.ensure_probe`), the reference as the run starts continues a fixed set of held-out
prompts (`drift_num_prompts`, from the eval split or `drift_prompts`), and scores those continuations and the general
texts of `drift_text_dataset`. These numbers are cached next to the precomputed reference log-probs, keyed by the
reference's weights and the token ids, so a second run (another learning rate, seed or loss) reuses them.

At every evaluation, and once before the first step (where each is 0; kept in the trainer state, not as a log entry
of its own: `DriftCallback`), `DriftMeasures.metrics` scores the same tokens with the policy, in eval mode:

- `forward_kl`: `KL(pi_ref || pi_theta)` per sampled token over the whole vocabulary, by a reference forward on the
  samples, wherever the run keeps a reference model (adapters disabled, the `"ref"` adapter, a separate or frozen
  model). Where it keeps none (a separate reference released after the precompute; full fine-tuning with `nll`),
  `forward_kl_sampled` instead: the sampled-token estimate from the cached reference log-probs, at no reference cost;
- `nll_change`: the per-token NLL of the general texts minus the reference's;
- the held-out m_theta is the trainer's `eval_deviation` (the paper's eq. 8 on the eval split's answers).

Under several processes each process scores its share of the samples (the same number of forwards on every process,
as a sharded model needs) and the sums are gathered: the same numbers as one process.
"""

import functools
import hashlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from accelerate.utils import broadcast_object_list, gather_object
from transformers import TrainerCallback, TrainerState
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import ExportableState

from ..cache import cache_root, cached_directory, is_complete
from ..errors import InputError
from ..examples import ExampleIndex
from ..precision import autocast_precision
from ..reference.models import reference_mode
from ..reference.precompute import REF_LOGPS, collated_batches
from ..reference.vocabulary_kl import lm_head_weights
from .data import (
    prompt_ids_from_conversations,
    prompt_ids_from_dataset,
    prompt_ids_from_prepared,
    text_ids_from_dataset,
)
from .measures import Sequences, forward_kl_sum, sample_continuations, score

logger = transformers.utils.logging.get_logger(__name__)

# 1: continuations, the reference's summed log-probs of them and of the texts; 2: sampled from the reference's
# distribution itself (`sampling_config`), no longer through the model's own `generation_config`
CACHE_FORMAT = 2
# Sequences per forward (and per generation) of the drift measures
BATCH_SIZE = 16

FORWARD_KL, FORWARD_KL_SAMPLED, NLL_CHANGE = "forward_kl", "forward_kl_sampled", "nll_change"


@dataclass
class DriftProbe:
    """What the drift measures compare the policy with, fixed before training.

    Attributes:
        samples: the prompts and the reference's continuations of them (the scored part).
        ref_sample_logps: `len(samples)` summed reference log-probs of each continuation.
        texts: general text (first token as the prompt, the rest scored), or `None`.
        ref_text_logps: `len(texts)` summed reference log-probs of each text.
    """

    samples: Sequences
    ref_sample_logps: list[float]
    texts: Sequences | None
    ref_text_logps: list[float]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DriftProbe":
        values = json.loads(text)
        texts = values["texts"]
        return cls(
            Sequences(**values["samples"]),
            values["ref_sample_logps"],
            Sequences(**texts) if texts is not None else None,
            values["ref_text_logps"],
        )


def timed(method):
    """Adds the wall time of each call to `seconds`: what the drift measures cost the run."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    return timed


class DriftMeasures:
    """The live drift measures of a `MinorSFTTrainer` (see the module docstring): off until `prepare`.

    Args:
        trainer: the trainer whose policy is measured (against its `reference`, on its eval split).
        eval_conversations: the raw eval split's first conversations, if it holds conversations
            (`first_conversations`): where the drift prompts of a conversation end.

    Attributes:
        seconds: wall time spent on the drift measures so far (the reference's samples included).
        plan: what the probe is built from, once prepared: (reference identity, prompts, texts); `None` while off.
        probe: the reference's samples and scores, once drawn.
    """

    def __init__(self, trainer, eval_conversations: list[list[dict]] | None = None):
        self.trainer = trainer
        self.eval_conversations = eval_conversations
        self.seconds = 0.0
        self.plan: tuple[dict, list[list[int]], Sequences | None] | None = None
        self.probe: DriftProbe | None = None
        # The frozen reference's hidden states on the samples, by rows (`_reference_states`)
        self._reference_states_by_rows: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def args(self):
        return self.trainer.args

    @property
    def accelerator(self):
        return self.trainer.accelerator

    # ------------------------------------------------------------------ before training

    @staticmethod
    def wanted(args, eval_dataset) -> bool:
        """Whether the run measures its drift: `eval_drift`, and an eval split to measure it on."""
        return bool(args.eval_drift) and eval_dataset is not None

    @property
    def on(self) -> bool:
        return self.plan is not None

    def prepare(self, reference_identity: dict) -> None:
        """Read and check the prompts and texts now, so that bad input stops the run before it starts. The reference's
        samples are drawn at their first use (once DeepSpeed or FSDP have wrapped the model) if the reference stays
        for the run, else now, with the reference as the run starts (a separate reference the precompute releases, or
        the policy itself in full fine-tuning without one)."""
        args = self.args
        texts = None
        if args.drift_text_dataset is not None:
            ids = text_ids_from_dataset(
                args.drift_text_dataset, self.trainer.processing_class, args.drift_num_texts, args.max_length
            )
            texts = Sequences([t[:1] for t in ids], [t[1:] for t in ids])
        self.plan = (reference_identity, self._prompts(), texts)
        if self.trainer.reference.stays_for_run:
            return
        logger.info(
            "The run keeps no reference model (a separate reference released after the precompute by "
            "precompute_ref_log_probs=True, or full fine-tuning with loss_type='nll'): the forward KL is logged as "
            "`eval_forward_kl_sampled`, its sampled-token estimate from the reference's log-probs of its samples, "
            "taken before training. The full-vocabulary `eval_forward_kl` needs the reference model kept: "
            "precompute_ref_log_probs 'auto' or False, or a loss with a reference."
        )
        self.ensure_probe()

    @timed
    def ensure_probe(self) -> None:
        """Draw the reference's samples and score them (or read them from the cache), once."""
        if self.probe is not None:
            return
        args = self.args
        reference_identity, prompts, texts = self.plan
        key = {
            "format": CACHE_FORMAT,
            "reference": reference_identity,
            "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "texts": hashlib.sha256(json.dumps(asdict(texts) if texts else None).encode()).hexdigest(),
            "max_new_tokens": args.drift_max_new_tokens,
            "seed": args.drift_seed,
            "batch_size": BATCH_SIZE,
            "autocast": autocast_precision(self.accelerator),
        }
        entry_name = "drift-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        entry = Path(args.ref_cache_dir or cache_root() / "ref_logps") / entry_name
        cached = None
        if self.accelerator.is_main_process and is_complete(entry, key):  # a damaged entry is rebuilt below
            cached = (entry / "probe.json").read_text()
        cached = broadcast_object_list([cached])[0] if self.accelerator.num_processes > 1 else cached
        if cached is not None:
            self.probe = DriftProbe.from_json(cached)
            logger.info(f"Drift measures: the reference's samples read from the cache ({entry}).")
            return
        probe = self._compute_probe(prompts, texts)
        if self.accelerator.is_main_process:
            cached_directory(entry, key, lambda out: (out / "probe.json").write_text(probe.to_json()))
        self.probe = probe

    def _prompts(self) -> list[list[int]]:
        """The token ids of the prompts the reference continues: `drift_prompts`, else the eval split's."""
        args = self.args
        if args.drift_prompts is not None:
            prompts = prompt_ids_from_dataset(
                args.drift_prompts, self.trainer.processing_class, args.drift_num_prompts
            )
            too_long = [len(p) for p in prompts if args.max_length is not None and len(p) > args.max_length]
            if too_long:
                raise InputError(
                    f"drift_prompts {args.drift_prompts!r}: {len(too_long)} of {len(prompts)} prompts are longer than "
                    f"max_length={args.max_length} tokens (up to {max(too_long)}). Shorten them, or raise max_length."
                )
            return prompts
        eval_dataset = self.trainer.eval_dataset
        if isinstance(eval_dataset, dict):
            eval_dataset = next(iter(eval_dataset.values()))
        conversation_prompts = None
        if self.eval_conversations is not None:
            conversation_prompts = prompt_ids_from_conversations(
                self.eval_conversations, self.trainer.processing_class, args.drift_num_prompts
            )
        return prompt_ids_from_prepared(eval_dataset, args.drift_num_prompts, args.max_length, conversation_prompts)

    def _compute_probe(self, prompts: list[list[int]], texts: Sequences | None) -> DriftProbe:
        """Sample and score with the reference, each process its share of the batches, gathered in order."""
        args = self.args
        continuations = {}
        with self.trainer.reference.running() as reference:
            for batch_index, rows in self._drift_shares(len(prompts)):
                generated = sample_continuations(
                    reference,
                    prompts,
                    rows,
                    args.drift_max_new_tokens,
                    seed=args.drift_seed + batch_index,
                    pad_id=self._pad_id(),
                    eos_id=self._plain_tokenizer.eos_token_id,
                    synced_gpus=self._drift_synced(),
                )
                if batch_index >= 0:
                    continuations.update(zip(rows, generated, strict=True))
        continuations = self._gathered(continuations)
        samples = Sequences(prompts, [continuations[i] for i in range(len(prompts))])
        ref_sample_logps = self._reference_sums(samples, keep_states=True)
        ref_text_logps = self._reference_sums(texts) if texts is not None else []
        logger.info(
            f"Drift measures: the reference continued {len(prompts)} prompts with "
            f"{sum(len(c) for c in samples.scored_ids)} tokens"
            + (f" and scored {len(texts)} texts." if texts is not None else ".")
        )
        return DriftProbe(samples, ref_sample_logps, texts, ref_text_logps)

    def _reference_sums(self, sequences: Sequences, keep_states: bool = False) -> list[float]:
        """The reference's summed log-probs of the scored part of each sequence; with `keep_states`, its hidden states
        are kept from the same forward for the evaluations (`_reference_states`)."""
        sums = {}
        with self.trainer.reference.running() as reference:
            for batch_index, rows in self._drift_shares(len(sequences)):
                with self.accelerator.autocast():
                    scored = score(reference, sequences.batch(rows, self._pad_id()), hidden_states=keep_states)
                logps = scored.logps
                if keep_states:
                    self._reference_states_by_rows[tuple(rows)] = scored.hidden_states
                if batch_index >= 0:
                    sums.update(zip(rows, logps.tolist(), strict=True))
        sums = self._gathered(sums)
        return [sums[i] for i in range(len(sequences))]

    # ------------------------------------------------------------------ at evaluations

    def _reference_states(self, reference: torch.nn.Module, rows: list[int], batch: dict) -> torch.Tensor:
        """`(T, hidden)` hidden states of the frozen reference predicting the sampled tokens of `rows`: computed by
        one reference forward the first time, then kept (a few MB), so an evaluation runs the policy alone."""
        key = tuple(rows)
        if key not in self._reference_states_by_rows:
            self._reference_states_by_rows[key] = score(reference, batch, hidden_states=True).hidden_states
        return self._reference_states_by_rows[key]

    @timed
    def metrics(self) -> dict[str, float]:
        """The drift measures of the policy now, without the `eval_` prefix (see the module docstring)."""
        self.ensure_probe()
        probe = self.probe
        policy = self.accelerator.unwrap_model(self.trainer.model)
        live = self.trainer.reference.is_live
        pad_id = self._pad_id()
        # kl (or sampled estimate) sum, sampled tokens, policy text log-prob sum, reference text log-prob sum, tokens
        totals = torch.zeros(5, dtype=torch.float64)
        for batch_index, rows in self._drift_shares(len(probe.samples)):
            weight = 1.0 if batch_index >= 0 else 0.0  # a process without a batch of its own runs one, unweighted
            batch = probe.samples.batch(rows, pad_id)
            with reference_mode(policy), self.accelerator.autocast():
                scored = score(policy, batch, hidden_states=live)
            if live:
                with self.trainer.reference.running() as reference, self.accelerator.autocast():
                    ref_hidden_states = self._reference_states(reference, rows, batch)
                    kl = forward_kl_sum(scored, ref_hidden_states, lm_head_weights(reference))
            else:
                # Per-sequence sums, as the reference's were kept: no other rounding where the policy has not moved
                kl = sum(probe.ref_sample_logps[i] - logp for i, logp in zip(rows, scored.logps.tolist(), strict=True))
            totals[0] += weight * float(kl)
            totals[1] += weight * float(scored.num_tokens.sum())
        if probe.texts is not None:
            for batch_index, rows in self._drift_shares(len(probe.texts)):
                weight = 1.0 if batch_index >= 0 else 0.0
                with reference_mode(policy), self.accelerator.autocast():
                    scored = score(policy, probe.texts.batch(rows, pad_id))
                totals[2] += weight * sum(scored.logps.tolist())
                totals[3] += weight * sum(probe.ref_text_logps[i] for i in rows)
                totals[4] += weight * float(scored.num_tokens.sum())
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.gather(totals[None].to(self.accelerator.device)).sum(0).cpu()
        kl_sum, kl_tokens, policy_text, ref_text, text_tokens = totals.tolist()
        metrics = {FORWARD_KL if live else FORWARD_KL_SAMPLED: kl_sum / max(kl_tokens, 1)}
        if probe.texts is not None:
            metrics[NLL_CHANGE] = (ref_text - policy_text) / max(text_tokens, 1)
        return metrics

    def answer_nll_at_start(self) -> float | None:
        """The held-out answers' NLL per token before the first step, where it costs nothing: the policy starts at its
        reference (`ReferenceCheck.starts_at_reference`: LoRA's adapters at identity, a frozen copy) and the
        reference's log-probs of the eval split are precomputed. `None` elsewhere (`eval_on_start=True` measures it
        by an evaluation)."""
        check = self.trainer.reference.check
        dataset = self.trainer.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        if check is None or not check.starts_at_reference or REF_LOGPS not in (dataset.column_names or []):
            return None
        ref_sum = sum(value for row in dataset[REF_LOGPS] for value in row)
        num_tokens = sum(
            int(ExampleIndex.from_batch(batch["labels"], batch.get("position_ids")).num_tokens.sum())
            for batch in collated_batches(self.trainer.data_collator, dataset, 1)
        )
        return -ref_sum / num_tokens if num_tokens else None

    # ------------------------------------------------------------------ plumbing

    def _drift_shares(self, count: int) -> Iterator[tuple[int, list[int]]]:
        """`(batch_index, rows)` of this process: batches of `BATCH_SIZE` rows dealt round-robin to the processes,
        each process running as many as the busiest one (a spare run has `batch_index` -1 and the first batch's rows,
        for a sharded model whose every forward needs every process)."""
        batches = [list(range(s, min(s + BATCH_SIZE, count))) for s in range(0, count, BATCH_SIZE)]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        for round_start in range(0, math.ceil(len(batches) / world) * world, world):
            index = round_start + rank
            yield (index, batches[index]) if index < len(batches) else (-1, batches[0])

    def _gathered(self, values: dict[int, object]) -> dict[int, object]:
        if self.accelerator.num_processes == 1:
            return values
        merged = {}
        for part in gather_object([values]):
            merged.update(part)
        return merged

    def _drift_synced(self) -> bool:
        """Whether generation must keep the processes in step (a sharded model)."""
        return self.accelerator.num_processes > 1 and (self.trainer.is_fsdp_enabled or is_deepspeed_zero3_enabled())

    @property
    def _plain_tokenizer(self):
        """The tokenizer (of a processor, for vision-language models)."""
        processing_class = self.trainer.processing_class
        return getattr(processing_class, "tokenizer", processing_class)

    def _pad_id(self) -> int:
        tokenizer = self._plain_tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class DriftCallback(TrainerCallback, ExportableState):
    """Measures the drift once before the first step (where it is 0), named as an evaluation names it, and keeps it
    in the trainer state (`stateful_callbacks` in `trainer_state.json`: a resumed run has it) rather than as a log
    entry of its own: `state.log_history` keeps the shape TRL gives it, and the drift curves and the model card start
    from these values (`drift_log_history`). With `eval_on_start=True`, TRL's own evaluation at step 0 measures them.

    Args:
        drift: the measures of the trainer whose drift is measured; `None` in the copy that transformers restores
            from a checkpoint (`restore_callback_states_from_checkpoint`), which only carries the values.
        measures_at_start: `{"eval_forward_kl": 0.0, ...}`, or `None` before they are measured.
    """

    def __init__(self, drift: DriftMeasures | None = None, measures_at_start: dict[str, float] | None = None):
        self.drift = drift
        self.measures_at_start = measures_at_start

    def state(self) -> dict:
        return {"args": {"measures_at_start": self.measures_at_start}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the start's values come with the checkpoint's state
            self.measures_at_start = measures_at_start(state)
        elif args.eval_on_start:
            self.measures_at_start = None
        else:
            self.measures_at_start = {f"eval_{k}": v for k, v in self.drift.metrics().items()}
            answer_nll = self.drift.answer_nll_at_start()
            if answer_nll is not None:
                self.measures_at_start["eval_answer_nll"] = answer_nll
            logger.info(f"Drift before the first step: {self.measures_at_start}")
        # The state was built before this call: write the values into it now, not only at the next checkpoint
        state.stateful_callbacks[type(self).__name__] = self.state()


def measures_at_start(state: TrainerState) -> dict[str, float] | None:
    """The drift measured before the first step (`DriftCallback`), as kept in the trainer state."""
    stored = state.stateful_callbacks.get(DriftCallback.__name__)
    return stored["args"]["measures_at_start"] if stored else None


def drift_log_history(state: TrainerState) -> list[dict]:
    """`state.log_history` led by the drift measured before the first step, as an entry at step 0: where the drift
    curves and the model card's table start. The trainer's own log stays as TRL writes it."""
    start = measures_at_start(state)
    return ([{"step": 0, **start}] if start else []) + state.log_history
