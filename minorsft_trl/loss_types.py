"""One declaration per reference-aware `loss_type`: what it needs from the reference, what it averages over, what it
logs. The trainer reads these and nothing else, so a new loss is a function in `losses.py` plus an entry here.

TRL's own `nll` and `dft` are not declared: `SFTTrainer` computes them.
"""

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .losses import (
    asft_loss,
    iw_sft_loss,
    iw_sft_weight,
    minor_sft_loss,
    minor_sft_weight,
    sft_dpo_loss,
    sft_dpo_weight,
    sft_kl_loss,
)


class ReferenceNeed(enum.Enum):
    """What a loss reads from the reference, per micro-batch."""

    SEQUENCE = "each example's summed answer log-prob"
    # Precomputed, as its top `ref_top_k` tokens, the rest's mass and draws from the rest (`reference.topk_anchor`)
    DISTRIBUTION = "the next-token distribution over the vocabulary at every answer token"


class MeanOver(enum.Enum):
    """What the batch loss averages over, across the micro-batches and processes of an optimizer step."""

    EXAMPLES = "examples"  # the paper's mean over (x, y): each example weighs the same, whatever its length
    TOKENS = "tokens"  # TRL's reduction: each answer token weighs the same


@dataclass(frozen=True)
class LossInputs:
    """What a loss sees of one micro-batch of `N` examples with `T` answer tokens (notation of `losses.py`).

    Attributes:
        policy_logps: `(N,)` summed answer log-probs of the policy, with gradient.
        ref_logps: `(N,)` summed answer log-probs of the reference.
        num_tokens: `(N,)` answer lengths `m_i`.
        token_logps: `(T,)` answer-token log-probs of the policy, with gradient.
        example_ids: `(T,)` the example (in `[0, N)`) of each answer token.
        token_kl: `(T,)` `KL(pi_ref || pi_theta)` per answer token, with gradient (estimated from the reference's
            top-k and draws where precomputed, `reference.topk_anchor`); `None` unless the loss needs the reference's
            distribution.
    """

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    num_tokens: torch.Tensor
    token_logps: torch.Tensor
    example_ids: torch.Tensor
    token_kl: torch.Tensor | None = None

    @classmethod
    def of(cls, index, token_logps: torch.Tensor, ref_logps: torch.Tensor, token_kl: torch.Tensor | None = None):
        """From the policy's `(batch, seq_len - 1)` per-token log-probs of a batch whose examples `index`
        (`examples.ExampleIndex`) numbers, and the reference's side."""
        return cls(
            policy_logps=index.sum(token_logps),
            ref_logps=ref_logps,
            num_tokens=index.num_tokens,
            token_logps=token_logps[index.answer_mask],
            example_ids=index.example_ids,
            token_kl=token_kl,
        )

    def per_example_sum(self, per_token: torch.Tensor) -> torch.Tensor:
        """`(N,)` sums over each example's answer tokens of a `(T,)` per-token tensor."""
        return per_token.new_zeros(self.num_tokens.numel()).index_add(0, self.example_ids, per_token)


@dataclass(frozen=True)
class LossType:
    """How the trainer runs one `loss_type`.

    Attributes:
        reference: what the loss reads from the reference.
        mean_over: what the batch loss averages the loss's values over.
        loss: `(inputs, args, kl_coef) -> (N,)` per-example values (`mean_over=EXAMPLES`) or `(T,)` per-token values
            (`TOKENS`); `kl_coef` is the KL anchor's coefficient of this step (`args.kl_coef`, or the one
            `target_forward_kl` steers to: `drift.steering`).
        settings: the `MinorSFTConfig` fields the loss reads (named with the run, e.g. in its plot's title).
        weight_name: the metric under which per-example weights are logged (with `_min` and `_max`), if any.
        weight: `(log_ratio, num_tokens, args) -> (N,)` the per-example weights the loss applies.
        brakes: whether the weights shrink towards 0 as the policy moves away from the reference: all of them near 0
            means learning has stopped (the trainer warns).
    """

    reference: ReferenceNeed
    mean_over: MeanOver
    loss: Callable[[LossInputs, object, float], torch.Tensor]
    settings: tuple[str, ...]
    weight_name: str | None = None
    weight: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor] | None = None
    brakes: bool = False


REFERENCE_LOSSES: dict[str, LossType] = {
    "minor_sft": LossType(
        ReferenceNeed.SEQUENCE,
        MeanOver.EXAMPLES,
        loss=lambda b, args, kl_coef: minor_sft_loss(b.policy_logps, b.ref_logps, b.num_tokens, args.beta),
        settings=("beta",),
        weight_name="minor_weight",
        weight=lambda log_ratio, num_tokens, args: minor_sft_weight(log_ratio, args.beta),
        brakes=True,
    ),
    "sft_dpo": LossType(
        ReferenceNeed.SEQUENCE,
        MeanOver.EXAMPLES,
        loss=lambda b, args, kl_coef: sft_dpo_loss(b.policy_logps, b.ref_logps, args.beta),
        settings=("beta",),
        weight_name="dpo_weight",
        weight=lambda log_ratio, num_tokens, args: sft_dpo_weight(log_ratio, args.beta),
        brakes=True,
    ),
    "asft": LossType(
        ReferenceNeed.DISTRIBUTION,
        MeanOver.TOKENS,
        loss=lambda b, args, kl_coef: asft_loss(b.token_logps, b.token_kl, kl_coef),
        settings=("kl_coef",),
    ),
    "sft_kl": LossType(
        ReferenceNeed.DISTRIBUTION,
        MeanOver.EXAMPLES,
        loss=lambda b, args, kl_coef: sft_kl_loss(
            b.policy_logps, b.per_example_sum(b.token_kl), b.num_tokens, kl_coef
        ),
        settings=("kl_coef",),
    ),
    "iw_sft": LossType(
        ReferenceNeed.SEQUENCE,
        MeanOver.TOKENS,
        loss=lambda b, args, kl_coef: iw_sft_loss(
            b.token_logps, b.example_ids, b.policy_logps, b.ref_logps, b.num_tokens, args.iw_weight_max
        ),
        settings=("iw_weight_max",),
        weight_name="iw_weight",
        weight=lambda log_ratio, num_tokens, args: iw_sft_weight(log_ratio, num_tokens, args.iw_weight_max),
    ),
}
