"""Where the reference model comes from, and how it runs.

| situation                                   | reference                                            |
|---------------------------------------------|------------------------------------------------------|
| `ref_model` given (path or model)           | that model, frozen, in eval mode                     |
| PEFT model built from a `peft_config`       | the same model with its adapters disabled            |
| PEFT model passed in (an adapter re-trained) | a frozen copy of that adapter, loaded as `"ref"`     |
| full fine-tuning                            | a frozen copy loaded from the policy's path          |
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import is_peft_model
from torch import nn

REF_ADAPTER = "ref"


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as a frozen reference: no gradient, eval mode (no dropout, no gradient checkpointing).

    The previous train/eval mode comes back on exit, also when the forward raises. The reference pass draws no random
    numbers, so the policy forward that follows is bit-identical to one without a reference pass.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def add_reference_adapter(model: nn.Module) -> None:
    """Give a PEFT model a frozen copy of its active adapter under the name `"ref"`, as TRL's `DPOTrainer` does.

    Used when the model arrives with an adapter of its own (re-training it): the reference is the adapter as it was
    at the start, not the bare base model. The copy keeps the dtype of each trained parameter (QLoRA casts the
    adapter to bfloat16), so at step 0 the reference equals the policy exactly.
    """
    active = model.active_adapter
    model.add_adapter(REF_ADAPTER, model.peft_config[active])
    model.set_adapter(active)
    marker = f".{active}."
    for name, param in model.named_parameters():
        if marker in name:
            ref_param = model.get_parameter(name.replace(marker, f".{REF_ADAPTER}."))
            ref_param.data = param.data.detach().clone()
            ref_param.requires_grad_(False)


def reference_adapter_name(model: nn.Module) -> str | None:
    """The adapter a PEFT policy uses as its own reference: the frozen `"ref"` copy if any, else `None` (disabled)."""
    return REF_ADAPTER if is_peft_model(model) and REF_ADAPTER in model.peft_config else None


def freeze(model: nn.Module) -> nn.Module:
    """Turn a separate reference model into a frozen one: eval mode, no parameter requires grad."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_vocabulary(policy: nn.Module, reference: nn.Module) -> None:
    """Raise if the reference scores tokens over a different vocabulary than the policy."""
    policy_vocab = policy.get_output_embeddings().weight.shape[0]
    ref_vocab = reference.get_output_embeddings().weight.shape[0]
    if policy_vocab != ref_vocab:
        raise ValueError(
            f"The reference model has a vocabulary of {ref_vocab} tokens but the policy has {policy_vocab}: their "
            "log-probabilities cannot be compared. Use a reference with the policy's tokenizer (for instance the "
            "model the policy was initialised from, resized the same way), or leave `ref_model` unset."
        )
