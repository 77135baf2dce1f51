"""Multiple-choice accuracy, each choice scored by its log-likelihood given the prompt (BIG-bench's
`multiple_choice_grade`)."""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from trl.data_utils import common_prefix_length
from trl.trainer.utils import pad


@dataclass(frozen=True)
class Accuracy:
    outcomes: tuple[bool, ...]  # per question, in the dataset's order: whether it was answered right

    @property
    def correct(self) -> int:
        return sum(self.outcomes)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def value(self) -> float:
        return self.correct / self.total

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy."""
        return math.sqrt(self.value * (1 - self.value) / self.total)

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% ± {100 * self.stderr:.1f} ({self.correct}/{self.total})"


def choice_token_ids(tokenizer, prompt: str, choice: str) -> tuple[list[int], int]:
    """Token ids of prompt + choice, and where the choice starts (where they diverge from the prompt's tokens)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
    return full_ids, common_prefix_length(prompt_ids, full_ids)


@torch.no_grad()
def choice_log_likelihoods(model, tokenizer, prompts, choices, batch_size: int = 32, desc: str = "Scoring"):
    """`(sum of log p(choice tokens | prompt))` for every (prompt, choice) pair.

    Args:
        prompts: `N` prompts.
        choices: `N` lists of choices (any number each).

    Returns:
        `N` lists of floats, one per choice.
    """
    pairs = [
        (row, *choice_token_ids(tokenizer, prompt, choice))
        for row, (prompt, row_choices) in enumerate(zip(prompts, choices, strict=True))
        for choice in row_choices
    ]
    # Longest first: batches of similar length waste little padding
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][1]))
    scores = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc):
            batch = [pairs[i] for i in order[start : start + batch_size]]
            input_ids = pad([torch.tensor(ids) for _, ids, _ in batch], padding_value=pad_id).to(device)
            attention_mask = pad([torch.ones(len(ids), dtype=torch.long) for _, ids, _ in batch], padding_value=0)
            logits = model(input_ids=input_ids, attention_mask=attention_mask.to(device)).logits[:, :-1].float()
            token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
            for j, (_, ids, choice_start) in enumerate(batch):
                # Prediction t scores token t + 1: the choice tokens are [choice_start, len(ids))
                scores[order[start + j]] = token_logps[j, max(choice_start, 1) - 1 : len(ids) - 1].sum().item()
    finally:
        model.train(was_training)
    per_row = [[] for _ in prompts]
    for (row, _, _), score in zip(pairs, scores, strict=True):
        per_row[row].append(score)
    return per_row


def multiple_choice_accuracy(model, tokenizer, dataset, batch_size: int = 32, desc: str = "Scoring") -> Accuracy:
    """Accuracy on a dataset with `prompt`, `choices` and `answer` columns (see `minorsft_trl.data.bigbench`)."""
    scores = choice_log_likelihoods(model, tokenizer, dataset["prompt"], dataset["choices"], batch_size, desc)
    answers = dataset["answer"]
    outcomes = tuple(max(range(len(s)), key=s.__getitem__) == a for s, a in zip(scores, answers, strict=True))
    return Accuracy(outcomes)


def _normalise_answer(text: str) -> str:
    """First line, lower case, single spaces, no trailing period: the form exact-match answers are compared in."""
    first_line = text.strip().split("\n")[0]
    return " ".join(first_line.lower().split()).rstrip(".").strip()


@torch.no_grad()
def exact_match_accuracy(
    model, tokenizer, dataset, batch_size: int = 16, max_new_tokens: int = 16, desc: str = "Generating"
) -> Accuracy:
    """Accuracy on a dataset with `prompt` and `targets` columns: greedy generation, first line compared with every
    accepted target (case, spacing and a final period ignored)."""
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues every prompt from its last token
    device = next(model.parameters()).device
    outcomes = []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc):
            rows = dataset[start : start + batch_size]
            inputs = tokenizer(rows["prompt"], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            outcomes += [
                _normalise_answer(answer) in {_normalise_answer(t) for t in targets}
                for answer, targets in zip(answers, rows["targets"], strict=True)
            ]
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return Accuracy(tuple(outcomes))


def task_accuracy(model, tokenizer, dataset, desc: str = "Scoring") -> Accuracy:
    """Multiple-choice accuracy if the dataset has `choices`, else exact-match accuracy on its `targets`."""
    if "choices" in dataset.column_names:
        return multiple_choice_accuracy(model, tokenizer, dataset, desc=desc)
    return exact_match_accuracy(model, tokenizer, dataset, desc=desc)


@torch.no_grad()
def mean_token_nll(model, tokenizer, texts: list[str], max_tokens: int = 256, batch_size: int = 8) -> float:
    """Mean negative log-likelihood per predicted token of `texts` (each cut to its first `max_tokens` tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="Held-out text NLL"):
            ids = [
                torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
                for text in texts[start : start + batch_size]
            ]
            input_ids = pad(ids, padding_value=pad_id).to(device)
            attention_mask = pad([torch.ones_like(i) for i in ids], padding_value=0).to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
            mask = attention_mask[:, 1:].bool()
            total_nll -= token_logps[mask].sum().item()
            total_tokens += int(mask.sum())
    finally:
        model.train(was_training)
    return total_nll / total_tokens
