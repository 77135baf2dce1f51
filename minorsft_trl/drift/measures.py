"""The drift measures, as functions of models and token ids: what the trainer logs at every evaluation.

For a policy `pi_theta` and its reference `pi_ref`:

- forward KL on reference samples ("RL's Razor", arXiv 2509.04259, which found it predicts forgetting): for prompts
  `x` and continuations `y ~ pi_ref(.|x)` drawn once,
  `sum_{x, t} KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)) / sum_x |y|`, each position's KL over the whole vocabulary
  (TRL's chunked kernel: no `(tokens, vocab)` tensor). Where only the reference's log-probs of the sampled tokens
  are kept, its sampled-token estimate `sum_{x, t} (log pi_ref(y_t|.) - log pi_theta(y_t|.)) / sum_x |y|`
  (unbiased, noisier);
- NLL change on general text: `NLL_theta - NLL_ref`, each the mean per-token negative log-likelihood;
- m_theta on held-out answers: the paper's eq. 8 on the eval split (the trainer's `eval_deviation`).

Every measure is 0 where the policy equals its reference.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GenerationMixin

from ..reference.vocabulary_kl import answer_hidden_states, captured_hidden_states, lm_head_weights, token_kl


@dataclass(frozen=True)
class Sequences:
    """Token sequences of which a part is scored: `prompt_ids[i] + scored_ids[i]`, the `scored_ids` counted."""

    prompt_ids: list[list[int]]
    scored_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batches(self, batch_size: int, pad_id: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """`(rows, batch)` for consecutive chunks of `batch_size` sequences, right-padded; `batch` has `input_ids`,
        `attention_mask` and `labels` (`-100` on the prompt and padding, so the fused LM head scores `scored_ids`)."""
        for start in range(0, len(self), batch_size):
            rows = list(range(start, min(start + batch_size, len(self))))
            yield rows, self.batch(rows, pad_id)

    def batch(self, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        length = max(len(self.prompt_ids[i]) + len(self.scored_ids[i]) for i in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, i in enumerate(rows):
            prompt, scored = self.prompt_ids[i], self.scored_ids[i]
            ids = torch.tensor(prompt + scored, dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sampling_config(max_new_tokens: int, pad_id: int, eos_id: int | None) -> GenerationConfig:
    """Ancestral sampling from the model's own distribution: temperature 1, no top-k / top-p, no logits processor."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )


@contextmanager
def own_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide what the model's `generation_config.json` ships (a `repetition_penalty`, suppressed tokens, ...) from
    `generate`, which fills every field its caller leaves unset from it: each module's `generation_config` is an
    empty one meanwhile, and given back after."""
    shipped = {module: module.generation_config for module in model.modules() if isinstance(module, GenerationMixin)}
    try:
        for module in shipped:
            module.generation_config = GenerationConfig()
        yield
    finally:
        for module, config in shipped.items():
            module.generation_config = config


@torch.no_grad()
def sample_continuations(
    model: torch.nn.Module,
    prompts: list[list[int]],
    rows: list[int],
    max_new_tokens: int,
    seed: int,
    pad_id: int,
    eos_id: int | None,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """Continuations of `prompts[i]` for `i` in `rows`, sampled from `model`'s distribution itself
    (`sampling_config`, whatever its `generation_config` says), cut after the end-of-sequence token. The random
    numbers are drawn from `seed` alone and the caller's random state is left as it was: sampling does not change the
    training run it happens in."""
    batch_prompts = [prompts[i] for i in rows]
    length = max(len(p) for p in batch_prompts)
    device = next(model.parameters()).device
    # Left padding: generation continues every prompt from its last token
    input_ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in batch_prompts], device=device)
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in batch_prompts], device=device)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), own_generation_config(model):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=sampling_config(max_new_tokens, pad_id, eos_id),
            synced_gpus=synced_gpus,
        )
    continuations = []
    for generated in output[:, length:].tolist():
        if eos_id is not None and eos_id in generated:  # keep the end of the text, drop the padding after it
            generated = generated[: generated.index(eos_id) + 1]
        continuations.append(generated)
    return continuations


@dataclass
class ScoredBatch:
    """One model's scores of a batch of `Sequences`: `(N,)` summed log-probs and counts of the scored tokens of each
    sequence, and `(T, hidden)` hidden states predicting the `T` scored tokens (if asked for) with the LM head."""

    logps: torch.Tensor
    num_tokens: torch.Tensor
    hidden_states: torch.Tensor | None = None
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None


def score(model: torch.nn.Module, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> ScoredBatch:
    """Score the labelled tokens of `batch` with `model` (a model with TRL's fused LM head, in whatever mode and
    gradient context the caller set): no `(batch, seq_len, vocab)` logits are built."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch["labels"][:, 1:] != -100
    if hidden_states:
        with captured_hidden_states(model) as captured:
            token_logps = model(**batch, use_cache=False, fused_lm_head=True).log_probs
    else:
        token_logps = model(**batch, use_cache=False, fused_lm_head=True).log_probs
    # Prompt-learning PEFT prepends virtual tokens to the outputs: align from the right
    token_logps = token_logps[:, -mask.size(1) :].float()
    logps = (token_logps * mask).sum(-1)
    if not hidden_states:
        return ScoredBatch(logps, mask.sum(-1))
    return ScoredBatch(logps, mask.sum(-1), answer_hidden_states(captured[-1], mask), lm_head_weights(model))


@torch.no_grad()
def forward_kl_sum(
    policy: ScoredBatch, ref_hidden_states: torch.Tensor, ref_head: tuple[torch.Tensor, torch.Tensor | None]
) -> torch.Tensor:
    """`sum_t KL(pi_ref || pi_theta)` over the scored tokens of a batch, each over the whole vocabulary.

    Args:
        policy: the policy's scores of the batch, with its hidden states and LM head.
        ref_hidden_states: `(T, hidden)` the reference's hidden states predicting the same `T` tokens.
        ref_head: the reference's LM head `(weight, bias)`.
    """
    return token_kl(policy.hidden_states, policy.head, ref_hidden_states, ref_head).sum()
