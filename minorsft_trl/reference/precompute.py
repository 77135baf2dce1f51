"""Reference log-probs computed once, cached on disk, and fed to training through the batches.

The reference is frozen, so all Minor SFT needs from it is one number per example: the sum of its answer-token
log-probs. They are stored per dataset row (a packed row holds several examples), attached as a `ref_logps` column,
and the collator concatenates them in the order in which `ExampleIndex` numbers the examples of a batch. The KL losses
(`sft_kl`, `asft`) also need the reference's next-token distribution at each answer token: the same pass keeps its
top `ref_top_k` tokens, the mass of the rest and `ref_tail_samples` tokens drawn from it (`topk_anchor`, stored by
`topk_cache`).

Under several processes every process computes its share of the batches (a sharded reference, FSDP or ZeRO-3, needs
every process in each forward anyway), the values are gathered in dataset order, and only the main process reads and
writes the cache; the others follow its lead (`_follow_main`) and receive the values.
"""

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from accelerate.utils import broadcast_object_list
from datasets import Dataset, IterableDataset
from tqdm.auto import tqdm
from transformers.integrations import is_deepspeed_zero3_enabled

from ..cache import cache_root, cached_directory
from ..errors import InputError
from ..examples import ExampleIndex
from ..precision import autocast_precision, half_precision
from ..validation import unwritable
from .check import deviation_tolerance
from .identity import batches_fingerprint
from .topk_anchor import ReferenceTopK, reference_topk
from .topk_cache import REF_TOPK_ROW, CachedTopK, TopKArrays, check_room
from .vocabulary_kl import causal_lm

logger = transformers.utils.logging.get_logger(__name__)

REF_LOGPS = "ref_logps"
# 2: keyed by the reference's configuration and the collated batches, computed under the training autocast
CACHE_FORMAT = 2


def split_per_row(values: np.ndarray, counts: np.ndarray) -> list[list[float]]:
    """Per-example values in dataset order, regrouped into one list per row (`counts[j]` values for row `j`)."""
    if len(values) != sum(counts):
        raise ValueError(f"{len(values)} cached values for {sum(counts)} examples")
    bounds = np.cumsum([0, *counts])
    return [values[start:end].tolist() for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass(frozen=True)
class ReferencePass:
    """What a precompute pass gives for a dataset, in dataset order.

    Attributes:
        logps: `(num_examples,)` float32 summed answer log-probs of the reference.
        topk: for the KL losses, the reference's top-k at each answer token (else `None`).
    """

    logps: np.ndarray
    topk: TopKArrays | None = None


def per_row_values(entry: Path) -> list[list[float]]:
    """The cached reference log-probs of a cache entry, one list per dataset row."""
    values = np.load(entry / "ref_logps.npy", allow_pickle=False)
    return split_per_row(values, np.load(entry / "examples_per_row.npy", allow_pickle=False))


@dataclass
class WithRefLogps:
    """Wraps a collator: the `ref_logps` lists of the examples become one `(num_examples,)` tensor in the batch, in
    the order of `ExampleIndex` (rows in batch order, the examples of a packed row in their order); where the rows
    carry a `ref_topk_row`, the batch also gets their answer tokens' top-k from `topk` (`CachedTopK.batch`), in the
    same order."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    topk: CachedTopK | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if REF_LOGPS not in examples[0]:  # a dataset passed to `evaluate` later: the reference runs on the fly
            return self.collator(examples)
        ref_logps = [value for example in examples for value in example[REF_LOGPS]]
        topk_rows = [example[REF_TOPK_ROW] for example in examples if REF_TOPK_ROW in example]
        added = (REF_LOGPS, REF_TOPK_ROW)
        batch = self.collator([{k: v for k, v in example.items() if k not in added} for example in examples])
        batch[REF_LOGPS] = torch.tensor(ref_logps, dtype=torch.float32)
        if topk_rows:
            batch.update(self.topk.batch(topk_rows))
        return batch


# Steps of the precompute that every process runs together, announced by the main process
_COMPUTE, _SAMPLE, _DONE = "compute", "sample", "done"


def collated_batches(collator, dataset: Dataset, batch_size: int, starts=None) -> Iterator[dict[str, Any]]:
    """The batches of a pass over `dataset` (all, or those beginning at `starts`), as `collator` builds them, in
    dataset order."""
    for start in range(0, len(dataset), batch_size) if starts is None else starts:
        yield collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


class ReferencePrecompute:
    """The precomputed reference of a `MinorSFTTrainer`: the values, their cache, and the passes that compute them.

    Args:
        trainer: the trainer whose datasets get the values and whose collator feeds them (its `reference` runs the
            passes, under its accelerator).
        reference_identity: the identity of the reference (`identity.model_identity`), taken before it was sharded.
    """

    def __init__(self, trainer, reference_identity: dict):
        self.trainer = trainer
        self.reference_identity = reference_identity
        # The KL losses' anchor: the reference's top-k tokens and draws from its rest at each answer token, besides
        # the summed log-probs
        self.top_k, self.tail_samples = None, 0
        self.topk = CachedTopK() if trainer.args.needs_reference_distribution else None
        if self.topk is not None:
            # The global shape, also of an FSDP2 shard
            head = causal_lm(trainer.accelerator.unwrap_model(trainer.model)).get_output_embeddings()
            self.top_k = min(trainer.args.ref_top_k, head.weight.shape[0])
            if self.top_k < trainer.args.ref_top_k:
                logger.info(
                    f"ref_top_k={trainer.args.ref_top_k} is more than the model's {self.top_k} tokens: the "
                    "precomputed KL anchor keeps all of them, and is the exact one."
                )
            # With every token kept the rest is empty: draws from it would weigh nothing
            self.tail_samples = trainer.args.ref_tail_samples if self.top_k < head.weight.shape[0] else 0

    def attach(self) -> None:
        """Give every train and eval row its examples' reference log-probs (from the cache, or computed once), feed
        them through the collator, and release a separate reference where the run asked for it
        (`Reference.releases_after_precompute`)."""
        trainer, args = self.trainer, self.trainer.args
        trainer.train_dataset = self.precomputed(
            trainer.train_dataset, "train", args.precompute_ref_batch_size or args.per_device_train_batch_size
        )
        if trainer.eval_dataset is not None:
            eval_batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
            if isinstance(trainer.eval_dataset, dict):
                trainer.eval_dataset = {
                    name: self.precomputed(dataset, f"eval {name}", eval_batch_size)
                    for name, dataset in trainer.eval_dataset.items()
                }
            else:
                trainer.eval_dataset = self.precomputed(trainer.eval_dataset, "eval", eval_batch_size)
        trainer.data_collator = WithRefLogps(trainer.data_collator, self.topk)
        if trainer.reference.releases_after_precompute:
            trainer.reference.release()

    def precomputed(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """`dataset` with a `ref_logps` column (one list of floats per row), read from the cache if it holds this
        exact reference and data, else computed by all processes and cached by the main one.

        The key: the reference (weights, configuration, adapter), the batches as the collator builds them (tokens,
        loss mask, packing, padding-free positions, batch layout) and the autocast precision the forward runs under.
        A cache hit is trusted only once a sample of its values agrees with a live reference pass."""
        trainer = self.trainer
        if not trainer.accelerator.is_main_process:  # only the main process keys, reads and writes the cache
            self._follow_main(dataset, name, batch_size)
            return self._with_values(dataset, *from_main_process(None))

        key = {
            "format": CACHE_FORMAT,
            "reference": self.reference_identity,
            "data": batches_fingerprint(collated_batches(trainer.data_collator, dataset, batch_size)),
            "autocast": autocast_precision(trainer.accelerator),
        }
        if self.top_k:  # an entry of the summed log-probs alone keeps its key, one without draws its own
            key["top_k"] = self.top_k
            if self.tail_samples:
                key["tail_samples"] = self.tail_samples
        entry_name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        entry = Path(trainer.args.ref_cache_dir or cache_root() / "ref_logps") / entry_name

        def build(out: Path) -> None:
            # One row at a time: a padding-free collator merges a batch's rows
            indices = [
                ExampleIndex.from_batch(batch["labels"], batch.get("position_ids"))
                for batch in collated_batches(trainer.data_collator, dataset, 1)
            ]
            if self.top_k:
                check_room(out, sum(int(index.num_tokens.sum()) for index in indices), self.top_k, self.tail_samples)
            computed = self._lead(_COMPUTE, dataset, name, batch_size)
            counts = [index.num_examples for index in indices]
            np.save(out / "ref_logps.npy", computed.logps, allow_pickle=False)
            np.save(out / "examples_per_row.npy", np.array(counts, dtype=np.int64), allow_pickle=False)
            if computed.topk is not None:
                computed.topk.save(out, [int(index.num_tokens.sum()) for index in indices])

        def agrees_with_live_reference(cached: Path) -> bool:
            live, num_tokens = self._lead(_SAMPLE, dataset, name, batch_size)
            return self._sample_agrees(
                name, per_row_values(cached), live, num_tokens, _sample_rows(dataset, batch_size)
            )

        cached_directory(entry, key, build, verify=agrees_with_live_reference)
        self._lead(_DONE, dataset, name, batch_size)
        return self._with_values(dataset, *from_main_process((per_row_values(entry), str(entry))))

    def _with_values(self, dataset: Dataset, values: list[list[float]], entry: str) -> Dataset:
        """`dataset` with its rows' reference log-probs, and the numbers of their top-k rows where the loss reads
        them (every process reads the entry the main process found)."""
        dataset = dataset.add_column(REF_LOGPS, values)
        if self.topk is None:
            return dataset
        return dataset.add_column(REF_TOPK_ROW, list(self.topk.add(Path(entry))))

    def _lead(self, step: str, dataset: Dataset, name: str, batch_size: int):
        """On the main process: announce `step` to the other processes, then run it with them."""
        from_main_process(step)
        return self._run_step(step, dataset, name, batch_size)

    def _follow_main(self, dataset: Dataset, name: str, batch_size: int) -> None:
        """On the other processes: run each step the main process announces, until it is done."""
        while (step := from_main_process(None)) != _DONE:
            self._run_step(step, dataset, name, batch_size)

    def _run_step(self, step: str, dataset: Dataset, name: str, batch_size: int):
        if step == _COMPUTE:
            return self.compute_ref_logps(dataset, name, batch_size)
        if step == _SAMPLE:
            rows = _sample_rows(dataset, batch_size)
            return self.batch_ref_logps(self.trainer.data_collator([dataset[i] for i in rows]))
        return None

    def batch_ref_logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(num_examples,)` summed answer log-probs of the reference on a collated batch, under the autocast that
        training runs under, and `(num_examples,)` answer lengths."""
        ref_logps, num_tokens, _ = self.batch_reference(batch)
        return ref_logps, num_tokens

    def batch_reference(self, batch: dict[str, Any], batch_number: int | None = None) -> tuple:
        """`batch_ref_logps`, and with a `batch_number` (the KL losses) the reference's top-k and draws from its rest
        at the batch's answer tokens (`reference_topk`, on the CPU), from the same forward. The draws' random numbers
        are seeded by the batch's number in the pass, so any number of processes draws the same tokens."""
        trainer = self.trainer
        batch = trainer._prepare_inputs(batch)
        index = ExampleIndex.from_batch(batch["labels"], batch.get("position_ids"))
        with trainer.accelerator.autocast():
            if batch_number is None:
                return trainer.reference.logps(batch, index).float().cpu(), index.num_tokens.cpu(), None
            ref_logps, answer_hidden, head = trainer.reference.distribution(batch, index)
            generator = torch.Generator(answer_hidden.device).manual_seed(batch_number)
            topk = reference_topk(answer_hidden, head, self.top_k, self.tail_samples, generator)
        return ref_logps.float().cpu(), index.num_tokens.cpu(), topk.cpu()

    def compute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> ReferencePass:
        """The summed answer log-probs of the reference for every example of `dataset` (and for the KL losses its
        top-k at every answer token), in dataset order. Each process computes a contiguous share of the batches
        (padded with repeats so every process runs as many forwards as the others, as a sharded model needs); the
        values are gathered on every process."""
        accelerator = self.trainer.accelerator
        starts = list(range(0, len(dataset), batch_size))
        with accelerator.split_between_processes(list(enumerate(starts)), apply_padding=True) as share:
            batches = collated_batches(self.trainer.data_collator, dataset, batch_size, [start for _, start in share])
            progress = tqdm(
                batches, total=len(share), desc=f"Reference log-probs ({name})",
                disable=not accelerator.is_local_main_process,
            )  # fmt: skip
            # A repeat of the padding within this process overwrites its original with the same values
            computed = {
                i: self.batch_reference(batch, i if self.top_k else None)
                for (i, _), batch in zip(share, progress, strict=True)
            }
        logps = self._gathered({i: ref_logps for i, (ref_logps, _, _) in computed.items()}, len(starts))
        if not self.top_k:
            return ReferencePass(logps.numpy())
        # One float32 row per answer token: the ids (exact in float32 below 2**24), their log-probs, the rest's, the
        # drawn ids and their log-probs
        rows = self._gathered(
            {
                i: torch.cat([t.ids.float(), t.logps, t.rest_logp[:, None], t.tail_ids.float(), t.tail_logps], 1)
                for i, (_, _, t) in computed.items()
            },
            len(starts),
        )
        ids, top_logps, rest, tail_ids, tail_logps = rows.split([self.top_k] * 2 + [1] + [self.tail_samples] * 2, 1)
        topk = ReferenceTopK(ids.long(), top_logps, rest.squeeze(1), tail_ids.long(), tail_logps)
        return ReferencePass(logps.numpy(), TopKArrays.of(topk))

    def _gathered(self, by_batch: dict[int, torch.Tensor], num_batches: int) -> torch.Tensor:
        """The values each process computed for its batches (`by_batch`: batch number -> `(n, ...)` values),
        gathered on every process in batch order, on the CPU."""
        accelerator = self.trainer.accelerator
        local = torch.cat(list(by_batch.values()))
        if accelerator.num_processes == 1:
            return local
        batch_ids = torch.cat([torch.full((values.size(0),), i) for i, values in by_batch.items()])
        device = accelerator.device
        return _in_batch_order(accelerator, local.to(device), batch_ids.to(device), num_batches)

    def _sample_agrees(self, name, cached: list[list[float]], live, num_tokens, rows: list[int]) -> bool:
        """Whether the live reference log-probs of the sampled `rows` equal the cached ones, to float noise."""
        expected = torch.tensor([value for row in rows for value in cached[row]])
        if expected.shape != live.shape:
            logger.warning(f"The cached reference log-probs of {name!r} hold another number of examples: rebuilding.")
            return False
        per_token = ((live - expected) / num_tokens).abs().max().item() if live.numel() else 0.0
        trainer = self.trainer
        tolerance = deviation_tolerance(half_precision(trainer.accelerator, trainer.model, trainer.reference), False)
        if per_token > tolerance:
            logger.warning(
                f"The cached reference log-probs of {name!r} differ from a live reference pass by up to "
                f"{per_token:.3g} nats per answer token (tolerance {tolerance:g}) on {len(rows)} sampled rows: "
                "rebuilding the cache entry."
            )
            return False
        return True


def _in_batch_order(accelerator, values: torch.Tensor, batch_ids: torch.Tensor, num_batches: int) -> torch.Tensor:
    """Every process's `(n, ...)` `values` (the examples or answer tokens of its batches, `batch_ids` naming each
    one's batch), gathered on every process, in batch order, each batch once, on the CPU: a process whose share was
    padded with repeats of another's batches (fewer batches than processes, or a share one short) holds copies that
    must not be counted twice."""
    # Tensors, not `gather_object`: all_gather_object over gloo leaves the process to abort at exit
    lengths = accelerator.gather(torch.tensor([values.size(0)], device=values.device)).tolist()
    gathered_values = accelerator.gather(accelerator.pad_across_processes(values, dim=0))
    gathered_values = gathered_values.view(len(lengths), -1, *values.shape[1:]).cpu()
    gathered_ids = accelerator.gather(accelerator.pad_across_processes(batch_ids, dim=0, pad_index=-1))
    by_batch = {}
    for process_values, ids, length in zip(
        gathered_values, gathered_ids.view(len(lengths), -1).cpu(), lengths, strict=True
    ):
        process_values, ids = process_values[:length], ids[:length]
        for batch in ids.unique().tolist():
            by_batch.setdefault(batch, process_values[ids == batch])
    if sorted(by_batch) != list(range(num_batches)):
        raise RuntimeError(f"The precompute gathered batches {sorted(by_batch)} of {num_batches}.")
    return torch.cat([by_batch[batch] for batch in range(num_batches)])


def _sample_rows(dataset: Dataset, batch_size: int) -> list[int]:
    """The rows whose cached values are checked against a live pass: one batch, spread over the dataset."""
    return sorted({round(i) for i in np.linspace(0, len(dataset) - 1, num=min(batch_size, len(dataset)))})


def resolve_precompute(args, train_dataset, eval_dataset) -> bool:
    """`precompute_ref_log_probs="auto"` made `True` wherever a precompute can serve, else `False`, and the choice
    said in one log line with its reason; `True` and `False` are returned as given."""
    if args.precompute_ref_log_probs is True and args.needs_reference_distribution and is_deepspeed_zero3_enabled():
        raise InputError(
            f"precompute_ref_log_probs=True with loss_type={args.loss_type!r} under DeepSpeed ZeRO-3: the precomputed "
            "KL anchor reads the LM head's rows whole, which ZeRO-3 partitions. Set precompute_ref_log_probs to "
            "false or 'auto' (the exact anchor, a reference forward each step), or train under ZeRO-2 or FSDP."
        )
    if args.precompute_ref_log_probs != "auto":
        return args.precompute_ref_log_probs
    reason = _why_not_precomputed(args, train_dataset, eval_dataset)
    if reason is None:
        cache_dir = args.ref_cache_dir or cache_root() / "ref_logps"
        anchor = (
            f", with the KL anchor's top ref_top_k={args.ref_top_k} tokens and ref_tail_samples="
            f"{args.ref_tail_samples} draws from the rest of the vocabulary"
            if args.needs_reference_distribution
            else ""
        )
        logger.warning(
            "precompute_ref_log_probs='auto': on. The reference's log-probs of the train and eval examples are "
            f"computed once before training{anchor} (cached in {cache_dir}), and training runs no reference forward; "
            "a separate reference model stays loaded for datasets passed to `evaluate` later (true frees it). Set it "
            "to false to run the reference at every step instead."
        )
        return True
    (logger.info if not args.uses_reference else logger.warning)(f"precompute_ref_log_probs='auto': off, {reason}.")
    return False


def _why_not_precomputed(args, train_dataset, eval_dataset) -> str | None:
    """Why a precompute cannot serve this run, or `None` if it can."""
    if not args.uses_reference:
        return f"loss_type={args.loss_type!r} reads nothing from the reference during training"
    if args.needs_reference_distribution and is_deepspeed_zero3_enabled():
        return (
            f"loss_type={args.loss_type!r} under DeepSpeed ZeRO-3: the precomputed KL anchor reads the LM head's rows "
            "whole, which ZeRO-3 partitions; the exact anchor runs the reference at every step"
        )
    evaluated = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    if any(isinstance(dataset, IterableDataset) for dataset in (train_dataset, *evaluated)):
        return "a dataset is streamed (an IterableDataset), which cannot be gone through before training"
    cache_dir = Path(args.ref_cache_dir or cache_root() / "ref_logps")
    reason = unwritable(cache_dir)
    return None if reason is None else f"the cache directory {str(cache_dir)!r} is not writable ({reason})"


def from_main_process(value):
    """The main process's `value`, on every process (unchanged in a single process)."""
    return broadcast_object_list([value], from_process=0)[0]
