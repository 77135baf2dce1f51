"""Reference log-probs computed once, cached on disk, and fed to training through the batches.

The reference is frozen, so all Minor SFT needs from it is one number per example: the sum of its answer-token
log-probs. They are stored per dataset row (a packed row holds several examples), attached as a `ref_logps` column,
and the collator concatenates them in the order in which `ExampleIndex` numbers the examples of a batch.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .examples import examples_per_row

REF_LOGPS = "ref_logps"
CACHE_FORMAT = 1
# Columns that hold everything the reference numbers depend on in the data: the tokens, the loss mask (completion-
# or assistant-only, truncation) and the packing of examples into rows
DATA_COLUMNS = ("input_ids", "labels", "seq_lengths")


def dataset_fingerprint(dataset: Dataset) -> str:
    """A sha256 of the tokenised dataset's content (not of its `_fingerprint`, which is random for some maps)."""
    digest = hashlib.sha256()
    columns = [c for c in DATA_COLUMNS if c in dataset.column_names]
    digest.update(json.dumps([columns, len(dataset)]).encode())
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096):
        for column in columns:
            for chunk in table.column(column).chunks:
                offsets = np.asarray(chunk.offsets)
                digest.update((offsets - offsets[0]).tobytes())
                digest.update(chunk.flatten().to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def module_fingerprint(
    module: torch.nn.Module, canonical_name: Callable[[str], str | None] = lambda name: name
) -> str:
    """A sha256 of a module's weights and buffers (names, dtypes, shapes, values). `canonical_name` renames each
    entry of the state dict, or returns `None` to leave it out."""
    digest = hashlib.sha256()
    entries = {canonical_name(name): tensor for name, tensor in module.state_dict().items()}
    for name, tensor in sorted((n, t) for n, t in entries.items() if n is not None and isinstance(t, torch.Tensor)):
        tensor = tensor.detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def peft_reference_name(name: str, other_adapters: list[str]) -> str | None:
    """The name of a PEFT model's state-dict entry in the plain model, or `None` for the weights of an adapter the
    reference does not run: the adapter-disabled reference then fingerprints exactly like its base model, whatever
    modules the LoRA wraps."""
    if any(f".{adapter}." in name for adapter in other_adapters):
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def rows_examples(dataset: Dataset) -> list[int]:
    """The number of examples with answer tokens in each row of a prepared dataset."""
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in dataset.column_names]
    return [
        examples_per_row(row.get("labels", row["input_ids"]), row.get("seq_lengths"))
        for row in dataset.select_columns(columns)
    ]


def split_per_row(values: np.ndarray, counts: list[int]) -> list[list[float]]:
    """Per-example values in dataset order, regrouped into one list per row."""
    if len(values) != sum(counts):
        raise ValueError(f"{len(values)} cached values for {sum(counts)} examples")
    bounds = np.cumsum([0, *counts])
    return [values[start:end].tolist() for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class WithRefLogps:
    """Wraps a collator: the `ref_logps` lists of the examples become one `(num_examples,)` tensor in the batch, in
    the order of `ExampleIndex` (rows in batch order, the examples of a packed row in their order)."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if REF_LOGPS not in examples[0]:  # a dataset passed to `evaluate` later: the reference runs on the fly
            return self.collator(examples)
        ref_logps = [value for example in examples for value in example[REF_LOGPS]]
        batch = self.collator([{k: v for k, v in example.items() if k != REF_LOGPS} for example in examples])
        batch[REF_LOGPS] = torch.tensor(ref_logps, dtype=torch.float32)
        return batch
