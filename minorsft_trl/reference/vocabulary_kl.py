"""The KL anchor of `asft` and `sft_kl`: per answer token, `KL(pi_ref || pi_theta)` over the whole vocabulary.

Neither model's `(tokens, vocab)` logits are built: the backbone outputs (hidden states) of both models at the answer
positions go through their LM heads in tiles, by TRL's `ChunkedDivergenceFunction` (the kernel of its
`DistillationTrainer`, whose forward KL with the reference as teacher is this KL), called on `KL_TOKEN_CHUNK` tokens at
a time so that its tile buffers stay small. The backward recomputes the tiles, so autograd keeps no logits either.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from ..errors import InputError

# Tokens per call of the kernel: its buffers hold `(KL_TOKEN_CHUNK, 32768)` fp32 tiles of both models, 128 MiB each
KL_TOKEN_CHUNK = 1024

# Configuration fields with which TRL's fused LM head scales or soft-caps the logits (`add_fused_lm_head`)
LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if is_peft_model(model) else model


def check_plain_logits(model: torch.nn.Module, loss_type: str) -> None:
    """Refuse a model whose logits are the LM head's output transformed (soft-capped or scaled): the KL kernel would be
    given the untransformed head."""
    config = causal_lm(model).config.get_text_config()
    transforms = {name: getattr(config, name) for name in LOGIT_TRANSFORM_FIELDS if getattr(config, name, None)}
    if transforms:
        raise InputError(
            f"loss_type={loss_type!r} computes its KL anchor from the LM head's outputs, but this model transforms "
            f"its logits ({', '.join(f'{k}={v}' for k, v in transforms.items())}), which the anchor does not apply. "
            "Use loss_type='minor_sft' or 'iw_sft', which need only the log-probs of the answers."
        )


@contextmanager
def captured_hidden_states(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `model`'s backbone appends its `(batch, seq_len, hidden)` last hidden states
    (with their graph) to the yielded list: the input of the LM head, read from the forward that computes the
    log-probs rather than from a second one."""
    captured = []
    backbone = causal_lm(model).base_model
    handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        yield captured
    finally:
        handle.remove()


def answer_hidden_states(hidden_states: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """`(num_answer_tokens, hidden)` hidden states that predict the answer tokens, in the order of `answer_mask`.

    Args:
        hidden_states: `(batch, seq_len', hidden)` backbone outputs; `seq_len' > seq_len` with prompt-learning virtual
            tokens, which come first.
        answer_mask: `(batch, seq_len - 1)` bool, the counted predictions (see `ExampleIndex`).
    """
    return hidden_states[:, :-1][:, -answer_mask.size(1) :][answer_mask]


def lm_head_weights(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(vocab, hidden)` weight and `(vocab,)` bias (or `None`) of `model`'s LM head, as TRL's fused LM head reads
    them: looked up on each call (PEFT and FSDP replace modules), FSDP2 shards gathered."""
    head = causal_lm(model).get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


def reference_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`lm_head_weights` of the reference, taken inside the reference's context: detached there, so that base
    parameters swapped to their starting values for the reference pass (`StartingBaseParameters`) keep them once it
    ends. A parameter partitioned by DeepSpeed ZeRO-3 stays the parameter, which TRL's kernel gathers for each use
    (detached, it would be its local shard, an empty tensor); ZeRO-3 refuses the swap."""
    return tuple(
        tensor if tensor is None or hasattr(tensor, "ds_id") else tensor.detach() for tensor in lm_head_weights(model)
    )


def token_kl(
    policy_hidden: torch.Tensor,
    policy_head: tuple[torch.Tensor, torch.Tensor | None],
    ref_hidden: torch.Tensor,
    ref_head: tuple[torch.Tensor, torch.Tensor | None],
) -> torch.Tensor:
    """Per answer token, `KL(pi_ref || pi_theta) = sum_v pi_ref(v) * (log pi_ref(v) - log pi_theta(v))`.

    Args:
        policy_hidden: `(T, hidden)` policy hidden states at the answer positions, with gradient.
        policy_head: the policy's LM head `(weight, bias)` (`lm_head_weights`), which gets the gradient if trainable.
        ref_hidden: `(T, hidden')` reference hidden states at the same positions, without gradient.
        ref_head: the reference's LM head `(weight, bias)` (`reference_head`): TRL's kernel differentiates only the
            policy's side.

    Returns:
        `(T,)` KL values (>= 0 up to rounding), differentiable through `policy_hidden` and the policy's LM head.
    """
    policy_weight, policy_bias = policy_head
    ref_weight, ref_bias = ref_head
    ref_hidden = ref_hidden.detach()
    chunks = [
        ChunkedDivergenceFunction.apply(
            policy_hidden[start : start + KL_TOKEN_CHUNK],
            policy_weight,
            policy_bias,
            ref_hidden[start : start + KL_TOKEN_CHUNK],
            ref_weight,
            ref_bias,
            0.0,  # forward KL(teacher || student), the reference being the teacher
        )[0]
        for start in range(0, policy_hidden.size(0), KL_TOKEN_CHUNK)
    ]
    return torch.cat(chunks) if chunks else policy_hidden.new_zeros(0, dtype=torch.float32)
