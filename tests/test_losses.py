"""The loss functions against hand-computed values and the paper's gradients (eqs. 4, 7, 8)."""

import math

import pytest
import torch
import torch.nn.functional as F

from minorsft_trl import deviation, minor_sft_loss, minor_sft_weight, sft_dpo_loss

BETA = 0.5


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_minor_sft_loss_matches_hand_computed_values():
    policy = torch.tensor([-6.0, -2.0, -9.0])
    ref = torch.tensor([-4.0, -2.0, -12.0])
    num_tokens = torch.tensor([3.0, 1.0, 4.0])
    # r = [-2, 0, 3]; w = 2 sigmoid(-beta r); loss = w * (-policy / m)
    expected = [2 * _sigmoid(1.0) * 2.0, 1.0 * 2.0, 2 * _sigmoid(-1.5) * 2.25]
    torch.testing.assert_close(minor_sft_loss(policy, ref, num_tokens, BETA), torch.tensor(expected))


def test_minor_sft_loss_equals_per_example_nll_where_policy_equals_reference():
    policy = torch.tensor([-6.0, -2.5])
    num_tokens = torch.tensor([3.0, 5.0])
    torch.testing.assert_close(minor_sft_loss(policy, policy.clone(), num_tokens, BETA), -policy / num_tokens)


def test_sft_dpo_loss_matches_hand_computed_values():
    policy = torch.tensor([-6.0, -2.0, -9.0])
    ref = torch.tensor([-4.0, -2.0, -12.0])
    expected = [-math.log(_sigmoid(-1.0)), math.log(2.0), -math.log(_sigmoid(1.5))]
    torch.testing.assert_close(sft_dpo_loss(policy, ref, BETA), torch.tensor(expected))


def test_weight_and_deviation_match_hand_computed_values():
    log_ratio = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(
        minor_sft_weight(log_ratio, BETA), torch.tensor([2 * _sigmoid(1.0), 1.0, 2 * _sigmoid(-1.5)])
    )
    torch.testing.assert_close(deviation(log_ratio, torch.tensor([4.0, 2.0, 6.0])), torch.tensor([-0.5, 0.0, 0.5]))


def _per_token_setup(seed: int = 0):
    """Per-token log-probs of 3 examples with 2, 3 and 5 answer tokens, as leaf tensors."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [2, 3, 5]
    token_logps = [(-torch.rand(n, generator=generator) * 3).requires_grad_() for n in lengths]
    ref_logps = torch.stack([tl.detach().sum() + torch.randn((), generator=generator) * 4 for tl in token_logps])
    return token_logps, ref_logps, torch.tensor(lengths, dtype=torch.float32)


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def test_minor_sft_gradient_is_paper_eq_7():
    token_logps, ref, num_tokens = _per_token_setup()
    policy = torch.stack([tl.sum() for tl in token_logps])
    grads = _grads(minor_sft_loss(policy, ref, num_tokens, BETA).sum(), token_logps)
    # eq. 7: -(2 / m) sigmoid(-beta r) grad log pi, and d log pi / d l_t = 1 for every answer token t
    r = policy.detach() - ref
    for i, grad in enumerate(grads):
        expected = -(2 / num_tokens[i]) * torch.sigmoid(-BETA * r[i])
        torch.testing.assert_close(grad, expected.expand_as(grad))


def test_minor_sft_has_the_gradient_of_its_closed_form():
    token_logps, ref, num_tokens = _per_token_setup(seed=1)
    policy = torch.stack([tl.sum() for tl in token_logps])
    detached_form = minor_sft_loss(policy, ref, num_tokens, BETA).sum()
    closed_form = (-(2 / (BETA * num_tokens)) * F.logsigmoid(BETA * (policy - ref))).sum()
    for got, expected in zip(_grads(detached_form, token_logps), _grads(closed_form, token_logps), strict=True):
        torch.testing.assert_close(got, expected)


def test_sft_dpo_gradient_is_paper_eq_4():
    token_logps, ref, _ = _per_token_setup(seed=2)
    policy = torch.stack([tl.sum() for tl in token_logps])
    grads = _grads(sft_dpo_loss(policy, ref, BETA).sum(), token_logps)
    r = policy.detach() - ref
    for i, grad in enumerate(grads):
        expected = -BETA * torch.sigmoid(-BETA * r[i])
        torch.testing.assert_close(grad, expected.expand_as(grad))


@pytest.mark.parametrize("log_ratio", [-5e4, 5e4])
def test_extreme_log_ratios_give_finite_losses_and_gradients(log_ratio):
    # |beta * r| = 2.5e4: sigmoid and exp overflow in a naive implementation
    policy = torch.tensor([log_ratio - 10.0], requires_grad=True)
    ref = torch.tensor([-10.0])
    num_tokens = torch.tensor([7.0])
    for loss in (minor_sft_loss(policy, ref, num_tokens, BETA), sft_dpo_loss(policy, ref, BETA)):
        (grad,) = torch.autograd.grad(loss.sum(), policy)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # The brake is fully on (weight 0) when the policy is far above the reference, and saturates at 2 below it
    assert minor_sft_weight(torch.tensor(log_ratio), BETA).item() == (0.0 if log_ratio > 0 else 2.0)
