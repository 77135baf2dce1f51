"""Reference log-probs computed once, cached on disk, and fed to training through the batches.

The reference is frozen, so all Minor SFT needs from it is one number per example: the sum of its answer-token
log-probs. They are stored per dataset row (a packed row holds several examples), attached as a `ref_logps` column,
and the collator concatenates them in the order in which `ExampleIndex` numbers the examples of a batch.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REF_LOGPS = "ref_logps"
# 2: keyed by the reference's configuration and the collated batches, computed under the training autocast
CACHE_FORMAT = 2


def split_per_row(values: np.ndarray, counts: np.ndarray) -> list[list[float]]:
    """Per-example values in dataset order, regrouped into one list per row (`counts[j]` values for row `j`)."""
    if len(values) != sum(counts):
        raise ValueError(f"{len(values)} cached values for {sum(counts)} examples")
    bounds = np.cumsum([0, *counts])
    return [values[start:end].tolist() for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def per_row_values(entry: Path) -> list[list[float]]:
    """The cached reference log-probs of a cache entry, one list per dataset row."""
    values = np.load(entry / "ref_logps.npy", allow_pickle=False)
    return split_per_row(values, np.load(entry / "examples_per_row.npy", allow_pickle=False))


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
