"""The KL anchor from the reference's top-k tokens (`minorsft_trl.reference.topk_anchor`) against brute force on full
`(tokens, vocab)` distributions in float64: without draws, equal to the full KL with k = the vocabulary, below it and
equal to the coarsening computed by hand for small k, with the full KL's gradient where they are equal; with draws
from the rest, the full KL and its gradient in expectation over the draw, computed exactly by enumerating it."""

import dataclasses

import pytest
import torch

from minorsft_trl.reference.topk_anchor import gathered_logits, reference_topk, topk_kl

VOCAB, HIDDEN, TOKENS = 48, 16, 10


def heads(seed: int = 0, bias: bool = True):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()

    policy = (draw(VOCAB, HIDDEN), draw(VOCAB, scale=0.5) if bias else None)
    reference = (draw(VOCAB, HIDDEN), draw(VOCAB, scale=0.5) if bias else None)
    return draw(TOKENS, HIDDEN), policy, draw(TOKENS, HIDDEN).detach(), reference


def logps(hidden, head):
    weight, bias = head
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return logits.log_softmax(-1)


def brute_force_coarsened(policy_logps, ref_logps, k):
    """KL between both distributions coarsened to the reference's top-k tokens and one bin for the rest."""
    ids = ref_logps.topk(k, dim=-1).indices
    p, q = ref_logps.exp(), policy_logps.exp()
    p_kept, q_kept = p.gather(-1, ids), q.gather(-1, ids)
    p_rest, q_rest = 1 - p_kept.sum(-1), 1 - q_kept.sum(-1)
    kept = (p_kept * (p_kept.log() - q_kept.log())).sum(-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-300).log() - q_rest.log()), 0.0)
    return kept + rest


def anchor(hidden, policy_head, ref_hidden, ref_head, answer_ids, k, tail_samples=0, reference=None):
    policy_answer_logps = logps(hidden, policy_head).gather(-1, answer_ids[:, None]).squeeze(-1)
    if reference is None:
        detached = tuple(t.detach() if t is not None else None for t in ref_head)
        reference = reference_topk(ref_hidden, detached, k, tail_samples, torch.Generator().manual_seed(0))
    return topk_kl(hidden, policy_head, answer_ids, policy_answer_logps, reference)


def full_kl(hidden, policy_head, ref_hidden, ref_head):
    ref_logps = logps(ref_hidden, ref_head).detach()
    return (ref_logps.exp() * (ref_logps - logps(hidden, policy_head))).sum(-1)


@pytest.mark.parametrize("bias", [True, False], ids=["biased head", "unbiased head"])
def test_with_k_the_vocabulary_the_anchor_is_the_full_kl_with_its_gradient(bias):
    hidden, policy_head, ref_hidden, ref_head = heads(bias=bias)
    answer_ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1))
    coarse = anchor(hidden, policy_head, ref_hidden, ref_head, answer_ids, k=VOCAB)
    ref_logps = logps(ref_hidden, ref_head).detach()
    full = (ref_logps.exp() * (ref_logps - logps(hidden, policy_head))).sum(-1)
    torch.testing.assert_close(coarse.double(), full, rtol=1e-5, atol=1e-6)
    params = [hidden, *(t for t in policy_head if t is not None)]
    for got, expected in zip(
        torch.autograd.grad(coarse.sum(), params), torch.autograd.grad(full.sum(), params), strict=True
    ):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_with_fewer_tokens_it_is_the_coarsening_below_the_full_kl(k):
    hidden, policy_head, ref_hidden, ref_head = heads(seed=k)
    answer_ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(k))
    coarse = anchor(hidden, policy_head, ref_hidden, ref_head, answer_ids, k=k)
    policy_logps, ref_logps = logps(hidden, policy_head), logps(ref_hidden, ref_head).detach()
    expected = brute_force_coarsened(policy_logps, ref_logps, k)
    torch.testing.assert_close(coarse.double(), expected, rtol=1e-5, atol=1e-6)
    full = (ref_logps.exp() * (ref_logps - policy_logps)).sum(-1)
    assert (coarse.double() <= full + 1e-6).all() and (coarse > -1e-6).all()
    params = [hidden, *policy_head]
    for got, brute in zip(
        torch.autograd.grad(coarse.sum(), params), torch.autograd.grad(expected.sum(), params), strict=True
    ):
        torch.testing.assert_close(got.double(), brute, rtol=1e-4, atol=1e-5)


def test_the_reference_top_k_and_its_rest_are_those_of_its_distribution():
    _, _, ref_hidden, ref_head = heads()
    ref_head = tuple(t.detach() for t in ref_head)
    top = reference_topk(ref_hidden, ref_head, k=5, chunk=3)  # chunks of 3 positions: 10 = 3 + 3 + 3 + 1
    ref_logps = logps(ref_hidden, ref_head)
    expected = ref_logps.topk(5, dim=-1)
    assert torch.equal(top.ids, expected.indices)
    torch.testing.assert_close(top.logps.double(), expected.values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(top.rest_logp.double().exp(), 1 - expected.values.exp().sum(-1), rtol=1e-5, atol=1e-7)
    assert torch.isneginf(reference_topk(ref_hidden, ref_head, k=VOCAB).rest_logp).all()
    with pytest.raises(ValueError, match="k must be between 1 and the vocabulary's 48 tokens, got 0"):
        reference_topk(ref_hidden, ref_head, k=0)


def test_the_gathered_logits_have_the_gradient_of_a_dense_projection():
    hidden, (weight, bias), _, _ = heads()
    ids = torch.randint(0, VOCAB, (TOKENS, 4), generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda h, w, b: gathered_logits(h, (w, b), ids).double(), (hidden, weight, bias))


@pytest.mark.parametrize("k", [1, 8, 20])
def test_over_the_draws_from_the_rest_the_anchor_is_the_full_kl_with_its_gradient(k):
    """The anchor is linear in the draws' indicators, so its expectation over the draws at a position is the sum, over
    every token `v` of the vocabulary, of the anchor with every draw `v`, weighted by `p(v | rest)` (0 for the
    top-k)."""
    hidden, policy_head, ref_hidden, ref_head = heads(seed=k)
    answer_ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(k))
    top = reference_topk(ref_hidden, tuple(t.detach() for t in ref_head), k, tail_samples=3)
    ref_logps = logps(ref_hidden, ref_head).detach()
    weights = (ref_logps.scatter(-1, top.ids, float("-inf")) - top.rest_logp.double()[:, None]).exp()
    expected_value = 0
    for v in range(VOCAB):
        drawn = torch.full((TOKENS, 3), v)
        reference = dataclasses.replace(top, tail_ids=drawn, tail_logps=ref_logps.gather(-1, drawn).float())
        expected_value = expected_value + weights[:, v] * anchor(
            hidden, policy_head, ref_hidden, ref_head, answer_ids, k, reference=reference
        )
    full = full_kl(hidden, policy_head, ref_hidden, ref_head)
    torch.testing.assert_close(expected_value, full, rtol=1e-5, atol=1e-6)
    params = [hidden, *policy_head]
    for got, exact in zip(
        torch.autograd.grad(expected_value.sum(), params), torch.autograd.grad(full.sum(), params), strict=True
    ):
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-5)


def test_the_draws_are_of_the_reference_rest_and_weigh_nothing_where_it_is_empty():
    hidden, policy_head, ref_hidden, ref_head = heads()
    ref_head = tuple(t.detach() for t in ref_head)
    ref_logps = logps(ref_hidden, ref_head)
    top = reference_topk(ref_hidden, ref_head, k=5, tail_samples=20_000, generator=torch.Generator().manual_seed(0))
    assert not (top.tail_ids[:, :, None] == top.ids[:, None, :]).any()  # never one of the top-k
    torch.testing.assert_close(top.tail_logps.double(), ref_logps.gather(-1, top.tail_ids), rtol=1e-6, atol=1e-6)
    frequencies = (
        torch.zeros(TOKENS, VOCAB, dtype=torch.float64).scatter_add_(
            1, top.tail_ids, torch.ones_like(top.tail_ids, dtype=torch.float64)
        )
        / top.tail_samples
    )
    expected = (ref_logps.scatter(-1, top.ids, float("-inf")) - top.rest_logp.double()[:, None]).exp()
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)
    again = reference_topk(ref_hidden, ref_head, k=5, tail_samples=20_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tail_ids, top.tail_ids)  # the precompute seeds the draw: any process draws the same
    # Every token kept: the rest is empty, the draws weigh nothing and the anchor is the full KL
    answer_ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(3))
    whole = anchor(hidden, policy_head, ref_hidden, ref_head, answer_ids, k=VOCAB, tail_samples=4)
    torch.testing.assert_close(
        whole, full_kl(hidden, policy_head, ref_hidden, ref_head).detach(), rtol=1e-5, atol=1e-6
    )
