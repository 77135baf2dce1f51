"""The KL anchor coarsened to the reference's top-k tokens and one "rest" bin: what `sft_kl` and `asft` need from the
reference, small enough to be computed once and cached (`2k + 1` numbers per answer token, not a distribution over the
vocabulary).

For an answer position with the reference's next-token distribution `p` and the policy's `q`, `I` the `k` tokens most
likely under `p` and `R` the rest of the vocabulary:

    KL_k(p || q) = sum_{i in I} p_i log(p_i / q_i) + p_R log(p_R / q_R),    p_R = 1 - sum_I p_i,   q_R = 1 - sum_I q_i

the KL between both distributions coarsened to `k + 1` outcomes. It is `KL(p || q)` itself when the rest is empty
(`k` the size of the vocabulary) and never above it otherwise: coarsening loses information (the data-processing
inequality). Distillation caches its teachers the same way (TRL's `SDFTTrainer` `topk_logits` with a tail bucket,
axolotl's knowledge-distillation plugin).

The policy's side costs `k` dot products per answer token: its log-normaliser comes from the log-prob of the answer
token that the fused LM head computes for the NLL anyway (`log q(y) = z_y - logsumexp(z)`), and no `(tokens, vocab)`
logits are built. The reference's side (`reference_topk`) projects the answer positions onto the whole vocabulary,
a few hundred tokens at a time, once.
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
    """The reference's next-token distribution at `T` answer positions, coarsened to its `k` most likely tokens and the
    rest.

    Attributes:
        ids: `(T, k)` int64 token ids, most likely first.
        logps: `(T, k)` float32 `log p_i` of those tokens.
        rest_logp: `(T,)` float32 `log p_R`, the log of the mass outside them (`-inf` where there is none).
    """

    ids: torch.Tensor
    logps: torch.Tensor
    rest_logp: torch.Tensor


@torch.no_grad()
def reference_topk(
    hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor | None], k: int, chunk: int = TOPK_TOKEN_CHUNK
) -> ReferenceTopK:
    """The reference's top-`k` tokens, their log-probs and the log-mass of the rest, at each of `T` answer positions.

    Args:
        hidden: `(T, hidden)` the reference's last hidden states that predict the answer tokens.
        head: the reference's LM head `(weight, bias)`: `(vocab, hidden)` and `(vocab,)` or `None`.
        k: tokens kept per position, `1 <= k <= vocab`.
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
        rest = logps.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
        parts.append((top.indices, top.values, rest))
    if not parts:
        empty = hidden.new_zeros(0, k, dtype=torch.float32)
        return ReferenceTopK(empty.long(), empty, hidden.new_zeros(0, dtype=torch.float32))
    ids, logps, rest = (torch.cat(part) for part in zip(*parts, strict=True))
    return ReferenceTopK(ids, logps, rest)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs (a gradient check)."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _GatheredLogits(torch.autograd.Function):
    """`z[t, j] = hidden[t] . weight[ids[t, j]] + bias[ids[t, j]]` in float32 (float64 for float64 inputs),
    `GATHER_TOKEN_CHUNK` positions at a time, each chunk one matrix product with the LM head's rows of the distinct
    ids it holds, whose columns are then gathered: neighbouring positions' top-k overlap, so this reads each row once
    per chunk where gathering `k + 1` rows per position read `(T, k, hidden)` values (memory-bound: 1.14x plain SFT's
    step at the Qwen2-7B shape scaled down, 1.01x this way; README, "The KL anchor precomputed"), and it is never more
    than one pass of the whole head. The backward recomputes the products, so autograd keeps nothing of them."""

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


def coarsened_kl(
    policy_hidden: torch.Tensor,
    policy_head: tuple[torch.Tensor, torch.Tensor | None],
    answer_ids: torch.Tensor,
    answer_logps: torch.Tensor,
    reference: ReferenceTopK,
) -> torch.Tensor:
    """Per answer token, `KL_k(p_ref || q_theta)` (module docstring), differentiable through the policy.

    Args:
        policy_hidden: `(T, hidden)` the policy's last hidden states that predict the answer tokens, with gradient.
        policy_head: the policy's LM head `(weight, bias)`, which gets the gradient if trainable.
        answer_ids: `(T,)` the answer tokens.
        answer_logps: `(T,)` the policy's log-probs of the answer tokens, with gradient (the fused LM head's): with the
            answer token's logit they give the log-normaliser, `logsumexp(z) = z_y - log q(y)`.
        reference: the reference's coarsened distribution at the same positions (`reference_topk`).

    Returns:
        `(T,)` float32 values (float64 for float64 inputs), `0 <= KL_k <= KL` up to rounding.
    """
    logits = gathered_logits(policy_hidden, policy_head, torch.cat([answer_ids[:, None], reference.ids], dim=1))
    log_normaliser = logits[:, 0] - answer_logps.to(logits.dtype)
    policy_logps = logits[:, 1:] - log_normaliser[:, None]
    # log q_R = log(1 - sum_I q_i), as TRL's `add_tail_bucket` takes a tail: expm1 of the kept mass's log, which is
    # exact where q_R is small, the kept mass held below 1 so that rounding never empties the rest
    kept_mass = policy_logps.logsumexp(-1).clamp(max=MAX_KEPT_LOG_MASS)
    policy_rest = torch.log(-torch.expm1(kept_mass))
    ref_probs, ref_rest = reference.logps.exp(), reference.rest_logp.exp()
    kept = (ref_probs * (reference.logps - policy_logps)).sum(-1)
    rest = torch.where(ref_rest > 0, ref_rest * (reference.rest_logp - policy_rest), torch.zeros_like(ref_rest))
    return kept + rest
