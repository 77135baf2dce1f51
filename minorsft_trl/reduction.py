"""How a micro-batch's per-example or per-token losses become its share of the optimizer step's loss, so that batch 8
x accumulation 1 == batch 4 x accumulation 2 == 2 processes x batch 4 (DESIGN.md: the normalisation)."""

import torch

from .examples import ExampleIndex

# Key under which `MinorSFTTrainer.get_batch_samples` hands `compute_loss` the examples of the whole optimizer step
NUM_EXAMPLES_KEY = "num_examples_in_step"


def count_examples_in_step(batch_samples: list[dict], device, accelerator, world_size: int) -> None:
    """Put the number of examples of the whole optimizer step (all micro-batches, all processes) into every batch,
    under `NUM_EXAMPLES_KEY`."""
    num_examples = sum(
        ExampleIndex.from_batch(batch["labels"], batch.get("position_ids")).num_examples for batch in batch_samples
    )
    num_examples = torch.tensor(num_examples, device=device)
    if world_size > 1:
        # The paper's mean is over the examples of the global batch: count them on every process, whatever
        # `average_tokens_across_devices` says of TRL's token mean
        num_examples = accelerator.gather(num_examples).sum()
    for batch in batch_samples:
        batch[NUM_EXAMPLES_KEY] = num_examples


def mean_over_examples(per_example: torch.Tensor, num_examples_in_step: torch.Tensor | None, num_processes: int):
    """Sum of this micro-batch's `(num_examples,)` per-example losses over the examples of the optimizer step
    (training), or over the examples of this micro-batch (evaluation: `num_examples_in_step` is `None`). A batch
    without examples gives a finite zero."""
    if num_examples_in_step is None:
        return per_example.sum() / max(per_example.numel(), 1)
    # The count spans every process and DDP averages the gradients across processes
    return per_example.sum() / num_examples_in_step.clamp(min=1) * num_processes


def mean_over_tokens(per_token: torch.Tensor, num_items_in_batch, token_scale: int) -> torch.Tensor:
    """Sum of this micro-batch's `(num_answer_tokens,)` per-token losses over the answer tokens of the optimizer step,
    reduced exactly as `SFTTrainer.compute_loss` reduces `nll` and `dft` (so `asft` is TRL's `dft` wherever its KL is
    0). `token_scale`: the processes over which TRL averages the token count (1 unless
    `average_tokens_across_devices`)."""
    num_tokens = per_token.numel() if num_items_in_batch is None else num_items_in_batch
    loss = per_token.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    return loss * token_scale if num_items_in_batch is not None else loss
