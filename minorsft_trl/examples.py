"""Which training example each predicted token belongs to, whatever the batch layout.

A padded batch holds one example per row. A padding-free batch (TRL's `padding_free=True`) or a packed one
(`packing=True` with a `bfd` strategy) holds several examples in one row; `position_ids` restart at 0 where each
begins. Minor SFT normalises per example, so per-token tensors are reduced per original example, never per row.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


@dataclass(frozen=True)
class ExampleIndex:
    """Maps the next-token predictions of a batch to its examples that have answer tokens.

    Predictions follow the fused LM head of TRL: position `t` of a `(batch, seq_len - 1)` per-token tensor scores
    token `t + 1`. A prediction counts when its label is not `-100` and its token does not start an example (the
    first token of an example has no context inside it). Examples without any counted prediction are left out.

    Attributes:
        answer_mask: `(batch, seq_len - 1)` bool, the counted predictions.
        example_ids: `(num_answer_tokens,)` long, the example (in `[0, num_examples)`) of each counted prediction,
            in row-major order of `answer_mask`.
        num_tokens: `(num_examples,)` float, the answer length `m_i` of each example (all > 0).
    """

    answer_mask: torch.Tensor
    example_ids: torch.Tensor
    num_tokens: torch.Tensor

    @classmethod
    def from_batch(cls, labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> "ExampleIndex":
        """Build the index from a collated batch.

        Args:
            labels: `(batch, seq_len)` token labels, `-100` where no loss is taken.
            position_ids: `(batch, seq_len)` positions, restarting at 0 at each example of a padding-free or packed
                row; `None` for a padded batch (one example per row).
        """
        starts = torch.zeros_like(labels, dtype=torch.bool)
        starts[:, 0] = True
        if position_ids is not None:
            starts |= position_ids == 0
        segment_ids = (starts.flatten().cumsum(0) - 1).view_as(labels)[:, 1:]
        answer_mask = (labels[:, 1:] != -100) & ~starts[:, 1:]
        # Renumber the segments that hold answer tokens as 0..num_examples-1
        _, example_ids = torch.unique(segment_ids[answer_mask], return_inverse=True)
        num_tokens = torch.bincount(example_ids).to(torch.float32)
        return cls(answer_mask=answer_mask, example_ids=example_ids, num_tokens=num_tokens)

    @property
    def num_examples(self) -> int:
        return self.num_tokens.numel()

    def sum(self, per_token: torch.Tensor) -> torch.Tensor:
        """Sum a per-token tensor over the answer tokens of each example.

        Args:
            per_token: `(batch, seq_len - 1)` values aligned with the predictions (e.g. log-probs).

        Returns:
            `(num_examples,)` sums, differentiable through `per_token`.
        """
        sums = per_token.new_zeros(self.num_examples)
        return sums.index_add(0, self.example_ids, per_token[self.answer_mask])


@dataclass
class PackedRowsApart:
    """TRL's collator where the eval rows are packed and the training rows are not (`packing=False`,
    `eval_packing=True`): the training collator gives a packed row no `position_ids`, so its examples would attend to
    each other and count as one. Rows that carry their `seq_lengths` (packed ones) are collated padding-free instead,
    as `packing=True` collates them: their examples kept apart by `position_ids`."""

    collator: DataCollatorForLanguageModeling
    padding_free: DataCollatorForLanguageModeling = dataclasses.field(init=False)

    def __post_init__(self):
        self.padding_free = dataclasses.replace(self.collator, padding_free=True)

    @classmethod
    def where_needed(cls, args, collator):
        """`collator` wrapped where the eval rows are packed and the training rows are not, else as it is."""
        if (
            args.eval_packing
            and not args.packing
            and isinstance(collator, DataCollatorForLanguageModeling)
            and not collator.padding_free
        ):
            return cls(collator)
        return collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return (self.padding_free if "seq_lengths" in examples[0] else self.collator)(examples)
