"""Per-example losses of Minor SFT (Xie et al., arXiv 2408.10642), as pure functions of tensors.

Notation, for example `i` of a batch of `N` examples, over its answer tokens only:

    policy_logps[i] = sum_t log pi_theta(y_t | x, y_<t)
    ref_logps[i]    = sum_t log pi_ref(y_t | x, y_<t)          (no gradient)
    num_tokens[i]   = m_i, the number of answer tokens (> 0)
    log_ratio[i]    = r_i = policy_logps[i] - ref_logps[i]

Every function returns one value per example; the trainer takes their mean over the examples of the global batch.
"""

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
