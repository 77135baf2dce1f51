"""The reference's top-k per answer token on disk, and read back into the batches (`topk_anchor` is the math).

A precompute entry of a KL loss holds, besides the summed log-probs, these arrays over the `T` answer tokens of its
dataset in dataset order (rows in order, each row's answer tokens in position order, as `ExampleIndex` numbers them):

    topk_ids.npy            (T, k) int32    the reference's k most likely tokens, most likely first
    topk_logps.npy          (T, k) float32  their log-probs
    rest_logps.npy          (T,)   float32  the log of the mass outside them (-inf where there is none)
    tail_ids.npy            (T, s) int32    s tokens drawn from the rest (only where s > 0)
    tail_logps.npy          (T, s) float32  their log-probs (only where s > 0)
    answer_tokens_per_row   (R,)   int64    the answer tokens of each of the R dataset rows

int32 holds any vocabulary. The log-probs stay float32, as the forward computed them: the anchor's gradient is
`q - p` per kept token, small where the policy is near its reference, and float16's rounding of `log p` (up to 2e-3
at `log p = -5`) moved it by 3e-3 of its norm on the test models. The README's precompute section gives the cost on
disk. `8 * (k + s) + 4` bytes per answer token: 772 for the defaults k = 64, s = 32.

Rows reach the batches by index: a precomputed dataset gets a `ref_topk_row` column, numbered across every entry of
the run (train and eval), and the collator (`precompute.WithRefLogps`) reads the rows of a batch from the
memory-mapped arrays, so no dataset copy or process holds the whole cache in memory.
"""

import shutil
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .topk_anchor import ReferenceTopK

REF_TOPK_ROW = "ref_topk_row"
# Keys of a collated batch that carries the precomputed anchor
TOPK_BATCH_KEYS = ("ref_topk_ids", "ref_topk_logps", "ref_rest_logp", "ref_tail_ids", "ref_tail_logps")
_FILES = ("topk_ids.npy", "topk_logps.npy", "rest_logps.npy")
_TAIL_FILES = ("tail_ids.npy", "tail_logps.npy")
_ROWS_FILE = "answer_tokens_per_row.npy"
# Storage types: token ids exact for any vocabulary, log-probs as computed (see the module docstring)
ID_DTYPE, LOGP_DTYPE = np.int32, np.float32


def bytes_per_answer_token(top_k: int, tail_samples: int) -> int:
    """What the anchor's arrays take on disk per answer token: 4-byte ids and log-probs, and the rest's log-mass."""
    return 8 * (top_k + tail_samples) + 4


def check_room(entry: Path, answer_tokens: int, top_k: int, tail_samples: int) -> None:
    """Stop before a precompute whose anchor would not fit on the disk of the cache entry `entry`."""
    needed = answer_tokens * bytes_per_answer_token(top_k, tail_samples)
    free = shutil.disk_usage(entry).free
    if needed > free:
        raise InputError(
            f"The precomputed KL anchor of {answer_tokens} answer tokens needs {needed / 1e9:.3g} GB on disk "
            f"(ref_top_k={top_k} tokens and ref_tail_samples={tail_samples} draws per answer token, "
            f"{bytes_per_answer_token(top_k, tail_samples)} bytes each), and {entry.parent} has {free / 1e9:.3g} GB "
            "free. Set ref_cache_dir to a disk with room, lower ref_top_k, or set precompute_ref_log_probs=false for "
            "the exact anchor (a reference forward at every step)."
        )


@dataclass(frozen=True)
class TopKArrays:
    """The reference's top-k at the `T` answer tokens of a dataset, in dataset order, as stored.

    Attributes:
        ids: `(T, k)` int32.
        logps: `(T, k)` float32.
        rest_logps: `(T,)` float32.
        tail_ids: `(T, s)` int32.
        tail_logps: `(T, s)` float32.
    """

    ids: np.ndarray
    logps: np.ndarray
    rest_logps: np.ndarray
    tail_ids: np.ndarray
    tail_logps: np.ndarray

    @classmethod
    def of(cls, topk: ReferenceTopK) -> "TopKArrays":
        """From the tensors `topk_anchor.reference_topk` computed, in the storage types."""
        ids, logps, rest, tail_ids, tail_logps = (
            tensor.cpu().numpy() for tensor in (topk.ids, topk.logps, topk.rest_logp, topk.tail_ids, topk.tail_logps)
        )
        return cls(
            ids.astype(ID_DTYPE),
            logps.astype(LOGP_DTYPE),
            rest.astype(LOGP_DTYPE),
            tail_ids.astype(ID_DTYPE),
            tail_logps.astype(LOGP_DTYPE),
        )

    def save(self, entry: Path, answer_tokens_per_row: list[int]) -> None:
        if sum(answer_tokens_per_row) != len(self.ids):
            raise ValueError(f"{len(self.ids)} cached answer tokens for {sum(answer_tokens_per_row)} in the rows")
        arrays = dict(zip(_FILES, (self.ids, self.logps, self.rest_logps), strict=True))
        if self.tail_ids.shape[1]:  # an entry without draws is the one the coarsened anchor always wrote
            arrays.update(zip(_TAIL_FILES, (self.tail_ids, self.tail_logps), strict=True))
        for name, array in arrays.items():
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
            if (entry / _TAIL_FILES[0]).exists():
                tail_ids, tail_logps = (np.load(entry / name, mmap_mode="r") for name in _TAIL_FILES)
            else:
                tail_ids, tail_logps = np.zeros((len(ids), 0), ID_DTYPE), np.zeros((len(ids), 0), LOGP_DTYPE)
            offsets = np.concatenate([[0], np.cumsum(np.load(entry / _ROWS_FILE))])
            self._opened[index] = (ids, logps, rest, tail_ids, tail_logps, offsets)
        return self._opened[index]

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The anchor of run-wide rows `rows`, concatenated in their order: `(T, k)` int64 ids, `(T, k)` float32
        log-probs, `(T,)` float32 rest log-probs, `(T, s)` int64 drawn ids and `(T, s)` float32 their log-probs, under
        the batch keys `TOPK_BATCH_KEYS`."""
        parts = []
        for row in rows:
            index = bisect_right(self._first_rows, row) - 1
            *arrays, offsets = self._arrays(index)
            local = row - self._first_rows[index]
            start, end = offsets[local], offsets[local + 1]
            parts.append([array[start:end] for array in arrays])
        # One copy out of the memory maps; the ids widened to the int64 that indexing takes
        ids, logps, rest, tail_ids, tail_logps = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        tensors = (
            torch.from_numpy(ids).long(),
            torch.from_numpy(logps),
            torch.from_numpy(rest),
            torch.from_numpy(tail_ids).long(),
            torch.from_numpy(tail_logps),
        )
        return dict(zip(TOPK_BATCH_KEYS, tensors, strict=True))

    def __getstate__(self) -> dict:
        # Dataloader workers open their own memory maps
        return {**self.__dict__, "_opened": {}}


def topk_from_batch(inputs: dict) -> ReferenceTopK | None:
    """The precomputed anchor a batch carries (popped from it), or `None`."""
    if TOPK_BATCH_KEYS[0] not in inputs:
        return None
    return ReferenceTopK(*(inputs.pop(key) for key in TOPK_BATCH_KEYS))
