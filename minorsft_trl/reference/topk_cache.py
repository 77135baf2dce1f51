"""The reference's top-k per answer token on disk, and read back into the batches (`topk_anchor` is the math).

A precompute entry of a KL loss holds, besides the summed log-probs, four arrays over the `T` answer tokens of its
dataset in dataset order (rows in order, each row's answer tokens in position order, as `ExampleIndex` numbers them):

    topk_ids.npy            (T, k) int32    the reference's k most likely tokens, most likely first
    topk_logps.npy          (T, k) float32  their log-probs
    rest_logps.npy          (T,)   float32  the log of the mass outside them (-inf where there is none)
    answer_tokens_per_row   (R,)   int64    the answer tokens of each of the R dataset rows

int32 holds any vocabulary. The log-probs stay float32, as the forward computed them: the anchor's gradient is
`q - p` per kept token, small where the policy is near its reference, and float16's rounding of `log p` (up to 2e-3
at `log p = -5`) moved it by 3e-3 of its norm on the test models. The README's precompute section gives the cost on
disk. `8 * k + 4` bytes per answer token: 2052 for the default k = 256.

Rows reach the batches by index: a precomputed dataset gets a `ref_topk_row` column, numbered across every entry of
the run (train and eval), and the collator (`precompute.WithRefLogps`) reads the rows of a batch from the
memory-mapped arrays, so no dataset copy or process holds the whole cache in memory.
"""

from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .topk_anchor import ReferenceTopK

REF_TOPK_ROW = "ref_topk_row"
# Keys of a collated batch that carries the precomputed anchor
REF_TOPK_IDS, REF_TOPK_LOGPS, REF_REST_LOGP = "ref_topk_ids", "ref_topk_logps", "ref_rest_logp"
TOPK_BATCH_KEYS = (REF_TOPK_IDS, REF_TOPK_LOGPS, REF_REST_LOGP)
_FILES = ("topk_ids.npy", "topk_logps.npy", "rest_logps.npy")
_ROWS_FILE = "answer_tokens_per_row.npy"
# Storage types: token ids exact for any vocabulary, log-probs as computed (see the module docstring)
ID_DTYPE, LOGP_DTYPE = np.int32, np.float32


@dataclass(frozen=True)
class TopKArrays:
    """The reference's top-k at the `T` answer tokens of a dataset, in dataset order, as stored.

    Attributes:
        ids: `(T, k)` int32.
        logps: `(T, k)` float32.
        rest_logps: `(T,)` float32.
    """

    ids: np.ndarray
    logps: np.ndarray
    rest_logps: np.ndarray

    @classmethod
    def of(cls, topk: ReferenceTopK) -> "TopKArrays":
        """From the tensors `topk_anchor.reference_topk` computed, in the storage types."""
        return cls(
            topk.ids.cpu().numpy().astype(ID_DTYPE),
            topk.logps.float().cpu().numpy().astype(LOGP_DTYPE),
            topk.rest_logp.float().cpu().numpy().astype(LOGP_DTYPE),
        )

    def save(self, entry: Path, answer_tokens_per_row: list[int]) -> None:
        if sum(answer_tokens_per_row) != len(self.ids):
            raise ValueError(f"{len(self.ids)} cached answer tokens for {sum(answer_tokens_per_row)} in the rows")
        for name, array in zip(_FILES, (self.ids, self.logps, self.rest_logps), strict=True):
            np.save(entry / name, array, allow_pickle=False)
        np.save(entry / _ROWS_FILE, np.asarray(answer_tokens_per_row, dtype=np.int64), allow_pickle=False)


class CachedTopK:
    """The top-k entries of a run, each readable row by row: `add` numbers an entry's rows after the rows of those
    added before, and `batch` gives the anchor of the rows of a batch. The arrays are opened memory-mapped in each
    process (and dataloader worker) on first use."""

    def __init__(self):
        self._entries: list[Path] = []
        self._first_rows: list[int] = []
        self._num_rows = 0
        self._opened: dict[int, tuple] = {}

    def add(self, entry: Path) -> range:
        """Register a cache entry; the run-wide numbers of its rows."""
        num_rows = len(np.load(Path(entry) / _ROWS_FILE, mmap_mode="r"))
        self._entries.append(Path(entry))
        self._first_rows.append(self._num_rows)
        self._num_rows += num_rows
        return range(self._first_rows[-1], self._num_rows)

    def _arrays(self, index: int) -> tuple:
        if index not in self._opened:
            entry = self._entries[index]
            ids, logps, rest = (np.load(entry / name, mmap_mode="r") for name in _FILES)
            offsets = np.concatenate([[0], np.cumsum(np.load(entry / _ROWS_FILE))])
            self._opened[index] = (ids, logps, rest, offsets)
        return self._opened[index]

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The anchor of run-wide rows `rows`, concatenated in their order: `(T, k)` int64 ids, `(T, k)` float32
        log-probs, `(T,)` float32 rest log-probs, under the batch keys `TOPK_BATCH_KEYS`."""
        parts = []
        for row in rows:
            index = bisect_right(self._first_rows, row) - 1
            ids, logps, rest, offsets = self._arrays(index)
            local = row - self._first_rows[index]
            start, end = offsets[local], offsets[local + 1]
            parts.append((ids[start:end], logps[start:end], rest[start:end]))
        # One copy out of the memory maps; the ids widened to the int64 that indexing takes
        ids, logps, rest = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return {
            REF_TOPK_IDS: torch.from_numpy(ids).long(),
            REF_TOPK_LOGPS: torch.from_numpy(logps),
            REF_REST_LOGP: torch.from_numpy(rest),
        }

    def __getstate__(self) -> dict:
        # Dataloader workers open their own memory maps
        return {**self.__dict__, "_opened": {}}


def topk_from_batch(inputs: dict) -> ReferenceTopK | None:
    """The precomputed anchor a batch carries (popped from it), or `None`."""
    if REF_TOPK_IDS not in inputs:
        return None
    ids, logps, rest = (inputs.pop(key) for key in TOPK_BATCH_KEYS)
    return ReferenceTopK(ids, logps, rest)
