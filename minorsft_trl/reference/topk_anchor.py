"""The KL anchor from the reference's top-k tokens and a sample of the rest: what `sft_kl` and `asft` need from the
reference, small enough to be computed once and cached (`2 (k + s) + 1` numbers per answer token, not a distribution
over the vocabulary).

For an answer position with the reference's next-token distribution `p` and the policy's `q`, `I` the `k` tokens most
likely under `p` and `R` the rest of the vocabulary, `KL(p || q)` splits into the top-k's part and the rest's:

    KL(p || q) = sum_{i in I} p_i log(p_i / q_i) + p_R E_{v ~ p(.|R)}[log(p_v / q_v)],     p_R = 1 - sum_I p_i

With `s` tokens `v_1..v_s` drawn from the reference's rest (`p` restricted to `R`, renormalised) once, when the
reference is precomputed, the anchor is

    KL_k,s = sum_{i in I} p_i log(p_i / q_i) + (p_R / s) sum_j log(p_{v_j} / q_{v_j})

whose expectation over the draw is `KL(p || q)`, and whose gradient's is the full KL's: an unbiased estimate, exact
where the rest is empty (`k` the size of the vocabulary). One token's value can fall below 0 (a draw where the policy
is above the reference), and so can a batch's mean where the rest holds most of the mass and the policy is near its
reference (the tests' tiny random models); on the 135M model's runs it never did (README, "The KL anchor
precomputed"). With `s = 0` the anchor is the KL between both distributions coarsened to the `k + 1`
outcomes `I` and `R`,

    KL_k(p || q) = sum_{i in I} p_i log(p_i / q_i) + p_R log(p_R / q_R),    q_R = 1 - sum_I q_i

never above `KL(p || q)` (coarsening loses information, the data-processing inequality): it understates the KL by
`p_R KL(p(.|R) || q(.|R))`, which is what the sample estimates. Distillation caches its teachers the same way as the
coarsened form (TRL's `SDFTTrainer` `topk_logits` with a tail bucket, axolotl's knowledge-distillation plugin).

The policy's side costs `k + s` dot products per answer token: its log-normaliser comes from the log-prob of the
answer token that the fused LM head computes for the NLL anyway (`log q(y) = z_y - logsumexp(z)`), and no
`(tokens, vocab)` logits are built. The reference's side (`reference_topk`) projects the answer positions onto the
whole vocabulary, a few hundred tokens at a time, once.
"""

from dataclasses import dataclass

import torch

# Answer tokens per projection onto the vocabulary in `reference_topk`: `(256, vocab)` float32 logits, 155 MB for a
# vocabulary of 152k
TOPK_TOKEN_CHUNK = 256
# The policy's mass on the reference's top-k is held at or below exp(-1e-7), TRL's floor for a tail bucket
# (`trl.experimental.sdft.loss_utils.add_tail_bucket`): the rest's log stays finite
MAX_KEPT_LOG_MASS = -1e-7
# Answer tokens per matrix product of `gathered_logits`: with the LM head's rows of the ids these positions hold, at
# most `64 (k + 1)` of them (fewer, since neighbouring positions' top-k overlap)
GATHER_TOKEN_CHUNK = 64


@dataclass(frozen=True)
class ReferenceTopK:
    """The reference's next-token distribution at `T` answer positions: its `k` most likely tokens, the mass of the
    rest, and `s` tokens drawn from the rest.

    Attributes:
        ids: `(T, k)` int64 token ids, most likely first.
        logps: `(T, k)` float32 `log p_i` of those tokens.
        rest_logp: `(T,)` float32 `log p_R`, the log of the mass outside them (`-inf` where there is none).
        tail_ids: `(T, s)` int64 tokens drawn from the reference's rest, with replacement (any tokens where the rest
            is empty: their weight `p_R` is 0).
        tail_logps: `(T, s)` float32 `log p_v` of those tokens.
    """

    ids: torch.Tensor
    logps: torch.Tensor
    rest_logp: torch.Tensor
    tail_ids: torch.Tensor
    tail_logps: torch.Tensor

    @property
    def tail_samples(self) -> int:
        return self.tail_ids.size(1)

    def cpu(self) -> "ReferenceTopK":
        return ReferenceTopK(*(tensor.cpu() for tensor in vars(self).values()))


@torch.no_grad()
def reference_topk(
    hidden: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None],
    k: int,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
    chunk: int = TOPK_TOKEN_CHUNK,
) -> ReferenceTopK:
    """The reference's top-`k` tokens, their log-probs, the log-mass of the rest and `tail_samples` tokens drawn from
    the rest, at each of `T` answer positions.

    Args:
        hidden: `(T, hidden)` the reference's last hidden states that predict the answer tokens.
        head: the reference's LM head `(weight, bias)`: `(vocab, hidden)` and `(vocab,)` or `None`.
        k: tokens kept per position, `1 <= k <= vocab`.
        tail_samples: tokens drawn per position from the rest, `p` restricted to it and renormalised.
        generator: the draw's random numbers (on `hidden`'s device), so that a precompute draws the same tokens on
            any number of processes.
        chunk: positions projected onto the vocabulary at a time (float32 logits).
    """
    weight, bias = head
    if not 1 <= k <= weight.size(0):
        raise ValueError(f"k must be between 1 and the vocabulary's {weight.size(0)} tokens, got {k}.")
    parts = []
    for start in range(0, hidden.size(0), chunk):
        logits = hidden[start : start + chunk].float() @ weight.float().T
        if bias is not None:
            logits += bias.float()
        logps = logits.log_softmax(-1)
        top = logps.topk(k, dim=-1)
        rest_logps = logps.scatter(-1, top.indices, float("-inf"))
        rest = rest_logps.logsumexp(-1)
        tail_ids = top.indices[:, :0]
        if tail_samples:
            # p(v | R); where the rest is empty, any distribution: the draws' weight is p_R = 0
            has_rest = torch.isfinite(rest)[:, None]
            tail = torch.where(has_rest, rest_logps - rest[:, None].where(has_rest, 0.0), logps).exp()
            tail_ids = torch.multinomial(tail, tail_samples, replacement=True, generator=generator)
        parts.append((top.indices, top.values, rest, tail_ids, logps.gather(-1, tail_ids)))
    if not parts:
        empty, no_draws = (hidden.new_zeros(0, width, dtype=torch.float32) for width in (k, tail_samples))
        return ReferenceTopK(empty.long(), empty, hidden.new_zeros(0, dtype=torch.float32), no_draws.long(), no_draws)
    return ReferenceTopK(*(torch.cat(part) for part in zip(*parts, strict=True)))


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (a gradient check)."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _GatheredLogits(torch.autograd.Function):
    """`z[t, j] = hidden[t] . weight[ids[t, j]] + bias[ids[t, j]]` in float32 (float64 for float64 inputs),
    `GATHER_TOKEN_CHUNK` positions at a time, each chunk one matrix product with the LM head's rows of the distinct
    ids it holds, whose columns are then gathered: neighbouring positions' top-k overlap, so this reads each row once
    per chunk where gathering `k + 1` rows per position read `(T, k, hidden)` values (memory-bound: 1.14x plain SFT's
    step at the Qwen2-7B shape scaled down with k = 256, 1.01x this way; README, "The KL anchor precomputed"), and it
    is never more than one pass of the whole head. The backward recomputes the products, so autograd keeps nothing
    of them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids):
        dtype = _compute_dtype(hidden)
        logits = hidden.new_empty(ids.shape, dtype=dtype)
        for start in range(0, ids.size(0), GATHER_TOKEN_CHUNK):
            end = start + GATHER_TOKEN_CHUNK
            rows, where = torch.unique(ids[start:end], return_inverse=True)
            logits[start:end] = (hidden[start:end].to(dtype) @ weight[rows].to(dtype).T).gather(1, where)
        if bias is not None:
            logits += bias.to(dtype)[ids]
        ctx.save_for_backward(hidden, weight, ids)
        ctx.has_bias = bias is not None
        return logits

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, weight, ids = ctx.saved_tensors
        dtype = grad_logits.dtype
        grad_hidden = torch.zeros_like(hidden, dtype=dtype) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, ids.size(0), GATHER_TOKEN_CHUNK):
            end = start + GATHER_TOKEN_CHUNK
            rows, where = torch.unique(ids[start:end], return_inverse=True)
            # The gradient of each distinct row's logit: summed where a position holds an id twice (the answer token
            # is also among the reference's top-k)
            grad = grad_logits[start:end]
            grad_rows = grad.new_zeros(grad.size(0), rows.numel()).scatter_add_(1, where, grad)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_rows @ weight[rows].to(dtype)
            if grad_weight is not None:
                grad_weight.index_add_(0, rows, grad_rows.T @ hidden[start:end].to(dtype))
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.zeros(weight.size(0), dtype=dtype, device=grad_logits.device)
            grad_bias.index_add_(0, ids.flatten(), grad_logits.flatten())
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias,
            None,
        )


def gathered_logits(
    hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None], ids: torch.Tensor
) -> torch.Tensor:
    """`(T, k)` float32 logits (float64 for float64 inputs) of the tokens `ids` (`(T, k)`) at each of `T` positions,
    differentiable through `hidden` (`(T, hidden)`) and the LM head `(weight, bias)` (`(vocab, hidden)`, `(vocab,)`
    or `None`)."""
    weight, bias = head
    return _GatheredLogits.apply(hidden, weight, bias, ids)


def topk_kl(
    policy_hidden: torch.Tensor,
    policy_head: tuple[torch.Tensor, torch.Tensor | None],
    answer_ids: torch.Tensor,
    answer_logps: torch.Tensor,
    reference: ReferenceTopK,
) -> torch.Tensor:
    """Per answer token, the anchor from the reference's top-k (module docstring): `KL_k,s` where `reference` holds
    draws from its rest, else the coarsened `KL_k(p_ref || q_theta)`; differentiable through the policy.

    Args:
        policy_hidden: `(T, hidden)` the policy's last hidden states that predict the answer tokens, with gradient.
        policy_head: the policy's LM head `(weight, bias)`, which gets the gradient if trainable.
        answer_ids: `(T,)` the answer tokens.
        answer_logps: `(T,)` the policy's log-probs of the answer tokens, with gradient (the fused LM head's): with the
            answer token's logit they give the log-normaliser, `logsumexp(z) = z_y - log q(y)`.
        reference: the reference's top-k, rest and draws at the same positions (`reference_topk`).

    Returns:
        `(T,)` float32 values (float64 for float64 inputs): `KL_k,s`, whose expectation over the draws is the full KL;
        with no draws `0 <= KL_k <= KL` up to rounding.
    """
    k = reference.ids.size(1)
    ids = torch.cat([answer_ids[:, None], reference.ids, reference.tail_ids], dim=1)
    logits = gathered_logits(policy_hidden, policy_head, ids)
    log_normaliser = logits[:, 0] - answer_logps.to(logits.dtype)
    policy_logps = logits[:, 1 : k + 1] - log_normaliser[:, None]
    ref_probs, ref_rest = reference.logps.exp(), reference.rest_logp.exp()
    kept = (ref_probs * (reference.logps - policy_logps)).sum(-1)
    if reference.tail_samples:
        # Where the rest is empty its draws are finite log-probs of any tokens, weighed by p_R = 0
        policy_tail = logits[:, k + 1 :] - log_normaliser[:, None]
        return kept + ref_rest * (reference.tail_logps - policy_tail).mean(-1)
    # log q_R = log(1 - sum_I q_i), as TRL's `add_tail_bucket` takes a tail: expm1 of the kept mass's log, which is
    # exact where q_R is small, the kept mass held below 1 so that rounding never empties the rest
    kept_mass = policy_logps.logsumexp(-1).clamp(max=MAX_KEPT_LOG_MASS)
    policy_rest = torch.log(-torch.expm1(kept_mass))
    rest = torch.where(ref_rest > 0, ref_rest * (reference.rest_logp - policy_rest), torch.zeros_like(ref_rest))
    return kept + rest
