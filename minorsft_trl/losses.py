"""The reference-aware losses, as pure functions of tensors: Minor SFT (Xie et al., arXiv 2408.10642) and its
neighbours, Anchored SFT (Zhu et al., arXiv 2509.23753), SFT + KL, and importance-weighted SFT (Qin & Springenberg,
arXiv 2507.12856).

Notation, for example `i` of a batch of `N` examples, over its answer tokens only (`T` of them in the batch):

    policy_logps[i] = sum_t log pi_theta(y_t | x, y_<t)
    ref_logps[i]    = sum_t log pi_ref(y_t | x, y_<t)          (no gradient)
    num_tokens[i]   = m_i, the number of answer tokens (> 0)
    log_ratio[i]    = r_i = policy_logps[i] - ref_logps[i]
    token_logps[t]  = log pi_theta(y_t | x, y_<t) of answer token t
    token_kl[t]     = KL(pi_ref(. | x, y_<t) || pi_theta(. | x, y_<t)), over the vocabulary

A per-example loss returns `(N,)` values, which the trainer averages over the examples of the global batch; a
per-token loss returns `(T,)` values, which it averages over the answer tokens of the global batch (TRL's reduction).
`minorsft_trl.loss_types` declares which is which and what each needs from the reference.
"""

import math

import torch
import torch.nn.functional as F


def minor_sft_weight(log_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """The Minor SFT brake `w_i = 2 * sigmoid(-beta * r_i)`, in `(0, 2)`; `1` where the policy equals the reference.

    Args:
        log_ratio: `(N,)` sequence log-ratios `r_i`.
        beta: the DPO temperature, > 0.

    Returns:
        `(N,)` weights, differentiable through `log_ratio` (detach the input to use them as constants).
    """
    return 2 * torch.sigmoid(-beta * log_ratio)


def minor_sft_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, num_tokens: torch.Tensor, beta: float
) -> torch.Tensor:
    """Minor SFT (paper eq. 7): the per-example mean NLL, weighted by the detached brake `w_i`.

    `loss_i = w_i * (-policy_logps_i / m_i)` with `w_i = 2 * sigmoid(-beta * r_i)` held constant, so that

        grad loss_i = -(2 / m_i) * sigmoid(-beta * r_i) * grad log pi_theta(y_i | x_i).

    The value equals the per-example mean NLL wherever the policy equals the reference (`w_i = 1`), so its curve
    compares with plain SFT. It has the gradient of the closed form `-(2 / (beta * m_i)) * log sigmoid(beta * r_i)`.

    Args:
        policy_logps: `(N,)` summed answer log-probs of the policy, with gradient.
        ref_logps: `(N,)` summed answer log-probs of the reference.
        num_tokens: `(N,)` answer lengths `m_i`, all > 0.
        beta: the DPO temperature, > 0.

    Returns:
        `(N,)` per-example losses.
    """
    weight = minor_sft_weight((policy_logps - ref_logps).detach(), beta)
    return weight * (-policy_logps / num_tokens)


def sft_dpo_weight(log_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """The factor `sigmoid(-beta * r_i)` of the "SFT using DPO" gradient (paper eq. 4), in `(0, 1)`: `1/2` where the
    policy equals the reference, towards 0 as the policy's answer gains on the reference's.

    Args:
        log_ratio: `(N,)` sequence log-ratios `r_i`.
        beta: the DPO temperature, > 0.

    Returns:
        `(N,)` weights.
    """
    return torch.sigmoid(-beta * log_ratio)


def sft_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's "SFT using DPO" (eq. 3): DPO's loss on the chosen answer alone, `-log sigmoid(beta * r_i)`.

    Its gradient is `-beta * sigmoid(-beta * r_i) * grad log pi_theta(y_i | x_i)` (paper eq. 4): a sum over the
    answer tokens, not a mean. `logsigmoid` keeps it finite for any `|beta * r_i|`.

    Args:
        policy_logps: `(N,)` summed answer log-probs of the policy, with gradient.
        ref_logps: `(N,)` summed answer log-probs of the reference.
        beta: the DPO temperature, > 0.

    Returns:
        `(N,)` per-example losses.
    """
    return -F.logsigmoid(beta * (policy_logps - ref_logps))


def deviation(log_ratio: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """The paper's deviation metric m_theta (eq. 8) per example: the log-ratio per answer token, `r_i / m_i`.

    Free of `beta` and of the answer length, so runs of different methods and data compare on one scale.

    Args:
        log_ratio: `(N,)` sequence log-ratios `r_i`.
        num_tokens: `(N,)` answer lengths `m_i`, all > 0.

    Returns:
        `(N,)` per-example deviations; their mean over a batch is m_theta.
    """
    return log_ratio / num_tokens


def dft_token_loss(token_logps: torch.Tensor) -> torch.Tensor:
    """TRL's DFT token loss (Wu et al., arXiv 2508.05629): the NLL of each answer token scaled by its detached
    probability, `-sg(p_t) * log p_t`, with gradient `-p_t * grad log p_t`.

    Args:
        token_logps: `(T,)` answer-token log-probs of the policy, with gradient.

    Returns:
        `(T,)` per-token losses.
    """
    return -token_logps.detach().exp() * token_logps


def asft_loss(token_logps: torch.Tensor, token_kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Anchored SFT: DFT's token loss plus a KL anchor to the reference, per answer token.

    The paper's eq. 6, `L_ASFT = L_DFT + lambda * E_s[KL(pi_base(.|s) || pi_theta(.|s))]`, per answer token:
    `loss_t = -sg(p_t) * log p_t + lambda * KL(pi_ref || pi_theta)_t`, the forward KL from the reference over the whole
    vocabulary at each answer position (the paper's ablation prefers it to the reverse KL), averaged like the DFT term
    over the answer tokens, as its code does. (The stored copies of the paper stop before its method section: the
    equation is taken from reviews that quote it, and agrees with the authors' code, `F.kl_div(log pi_theta, pi_ref)`
    summed over the vocabulary.) The paper recommends `lambda = 0.05`; its code defaults to 0.1. So that

        grad loss_t = -p_t * grad log p_t + lambda * sum_v (pi_theta(v) - pi_ref(v)) * grad z_v

    with `z` the policy's logits. Where the policy equals the reference the KL and its gradient are 0: the loss and
    gradient are exactly DFT's.

    Args:
        token_logps: `(T,)` answer-token log-probs of the policy, with gradient.
        token_kl: `(T,)` `KL(pi_ref || pi_theta)` at each answer token, with gradient.
        kl_coef: `lambda` >= 0.

    Returns:
        `(T,)` per-token losses.
    """
    return dft_token_loss(token_logps) + kl_coef * token_kl


def sft_kl_loss(
    policy_logps: torch.Tensor, example_kl: torch.Tensor, num_tokens: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Plain SFT with ASFT's KL anchor (the SFT + KL ablation of ASFT and TorchRL's `SFTLoss(kl_to_ref_coeff)`): the
    per-example mean NLL plus `lambda` times the example's mean per-token `KL(pi_ref || pi_theta)`.

    `loss_i = (-policy_logps_i + lambda * sum_t KL_t) / m_i`, so that

        grad loss_i = -(1 / m_i) * sum_t [grad log p_t - lambda * grad KL_t].

    Where the policy equals the reference it is the per-example mean NLL, with its gradient.

    Args:
        policy_logps: `(N,)` summed answer log-probs of the policy, with gradient.
        example_kl: `(N,)` the per-token KL summed over each example's answer tokens, with gradient.
        num_tokens: `(N,)` answer lengths `m_i`, all > 0.
        kl_coef: `lambda` >= 0.

    Returns:
        `(N,)` per-example losses.
    """
    return (-policy_logps + kl_coef * example_kl) / num_tokens


def iw_sft_weight(log_ratio: torch.Tensor, num_tokens: torch.Tensor, max_weight: float) -> torch.Tensor:
    """The iw-SFT importance weight `w_i = clip(exp(r_i / m_i), 0, max_weight)`: the policy / reference likelihood
    ratio of the answer, as a geometric mean per answer token, clipped above.

    It grows with `r_i`, where Minor SFT's `2 * sigmoid(-beta * r_i)` shrinks: iw-SFT leans into the examples the
    policy has already moved towards, Minor SFT brakes them. `1` where the policy equals the reference.

    Args:
        log_ratio: `(N,)` sequence log-ratios `r_i`.
        num_tokens: `(N,)` answer lengths `m_i`, all > 0.
        max_weight: the upper clip, > 0 (16 in the authors' code).

    Returns:
        `(N,)` weights in `[0, max_weight]`, differentiable through `log_ratio` (detach it to use them as constants).
    """
    # exp(min(x, log max)) == min(exp(x), max), without overflowing to inf for a large ratio
    return torch.exp((log_ratio / num_tokens).clamp(max=math.log(max_weight)))


def iw_sft_loss(
    token_logps: torch.Tensor,
    example_ids: torch.Tensor,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    num_tokens: torch.Tensor,
    max_weight: float,
) -> torch.Tensor:
    """Importance-weighted SFT (Qin & Springenberg, arXiv 2507.12856): each answer token's NLL scaled by its example's
    detached weight `w_i = clip(exp(r_i / m_i), 0, max_weight)` (see `iw_sft_weight`), so that

        grad loss_t = -w_i * grad log p_t,

    averaged over the answer tokens of the batch. This is the authors' code (`IwSFTLoss` with `sum_over_time=True`
    and temperature 1, the sequence-level variant the paper reports as iw-SFT): the stored copies of the paper stop
    before its method section, so the code is the definition followed here. Where the policy equals the reference
    every weight is 1 and this is TRL's token-mean NLL.

    Args:
        token_logps: `(T,)` answer-token log-probs of the policy, with gradient.
        example_ids: `(T,)` the example (in `[0, N)`) of each answer token.
        policy_logps: `(N,)` summed answer log-probs of the policy.
        ref_logps: `(N,)` summed answer log-probs of the reference.
        num_tokens: `(N,)` answer lengths `m_i`, all > 0.
        max_weight: the upper clip of the weights, > 0.

    Returns:
        `(T,)` per-token losses.
    """
    weight = iw_sft_weight((policy_logps - ref_logps).detach(), num_tokens, max_weight)
    return weight[example_ids] * -token_logps
