"""TRL's fused LM head, made to project only the positions that have a label on every device that allows it.

`trl.trainer.utils.add_fused_lm_head` (which `SFTTrainer` puts on every model) projects only the labelled positions
through the LM head on devices with Triton, and every position elsewhere, so that on devices whose kernels are
compiled per shape (XLA, Neuron) the number of labelled positions does not change the shapes. On a CPU the LM head
(a fifth of SmolLM2-135M's compute per token) then runs on every prompt token too, in the policy's forward and
backward and in the reference pass, where only the answer tokens are scored.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from unittest.mock import patch

import torch
import trl.trainer.utils as trl_utils

from .reference.vocabulary_kl import captured_hidden_states

# Device types whose kernels are compiled per shape: there TRL's choice (every position) stands
_PER_SHAPE_COMPILED = ("xla", "neuron")


@contextmanager
def labelled_positions_only() -> Iterator[None]:
    """Within the block, TRL's fused LM head takes its compact path (the labelled positions only, scattered back into
    zeros) on every device but XLA and Neuron: the same per-token values (the kernels run per position), less work.

    Used for every forward of a run that reads its reference, policy and reference alike, so that both sides of the
    log-ratio run the same computation and it is exactly 0 where the policy equals its reference."""
    use_compact = trl_utils._use_triton

    def compact(device) -> bool:
        return device.type not in _PER_SHAPE_COMPILED or use_compact(device)

    with patch.object(trl_utils, "_use_triton", compact):
        yield


class FusedForwardRecorder:
    """Calls a model and keeps the outputs of its fused-LM-head forward, so that `SFTTrainer.compute_loss` computes
    its metrics (`entropy`, `mean_token_accuracy`, `num_tokens`, `aux_loss`) from the very forward whose per-token
    log-probs our loss uses; given `unwrapped` (the model without its DDP / FSDP wrapper), also that forward's last
    hidden states (the LM head input)."""

    def __init__(self, model: torch.nn.Module, unwrapped: torch.nn.Module | None = None):
        self.model = model
        self.unwrapped = unwrapped
        self.outputs = None
        self.hidden_states = None

    def __call__(self, *args, **kwargs):
        if not (kwargs.get("fused_lm_head") and self.unwrapped is not None):
            outputs = self.model(*args, **kwargs)
        else:
            with captured_hidden_states(self.unwrapped) as captured:
                outputs = self.model(*args, **kwargs)
            self.hidden_states = captured[-1]
        if kwargs.get("fused_lm_head"):
            self.outputs = outputs
        return outputs
