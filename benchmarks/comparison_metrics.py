"""Drift measures of the method comparison that do not saturate when the training answers are learnt.

- `heldout_answer_logps`: log pi(answer | prompt) and its length on held-out questions; the held-out m_theta of a
  run is the mean over questions of `(log pi_theta - log pi_base) / m`, on answers it was not trained on.
- `base_generations` / `forward_kl_on_base_text`: the forward `KL(pi_base || pi_theta)` per token on text the base
  model samples for held-out prompts (the measure of "RL's Razor", arXiv 2509.04259, which predicted forgetting):
  `E_{y ~ pi_base}[sum_t KL(pi_base(.|x, y_<t) || pi_theta(.|x, y_<t))] / |y|`, each position's KL over the whole
  vocabulary.
"""

import torch
from trl.trainer.utils import pad

from minorsft_trl.evaluation import choice_log_likelihoods, choice_token_ids


def heldout_answer_logps(model, tokenizer, prompts: list[str], answers: list[str]) -> tuple[list[float], list[int]]:
    """`log pi(answer | prompt)` summed over the answer's tokens, and that number of tokens, per question."""
    sums = [
        row[0] for row in choice_log_likelihoods(model, tokenizer, prompts, [[a] for a in answers], desc="m_theta")
    ]
    # The tokens `choice_log_likelihoods` scores: from where prompt + answer leaves the prompt's tokens (at least 1)
    token_ids = [choice_token_ids(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    return sums, [len(ids) - max(answer_start, 1) for ids, answer_start in token_ids]


def heldout_deviation(policy_sums: list[float], base_sums: list[float], lengths: list[int]) -> float:
    """The paper's m_theta (eq. 8) on held-out answers: mean over questions of the log-ratio per answer token."""
    ratios = [(p - b) / m for p, b, m in zip(policy_sums, base_sums, lengths, strict=True) if m > 0]
    return sum(ratios) / len(ratios)


@torch.no_grad()
def base_generations(
    model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16
) -> list[dict]:
    """For each prompt, a continuation sampled from the base model (temperature 1, no top-k / top-p), as token ids:
    `{"prompt_ids": [...], "generated_ids": [...]}`. Fixed by `seed`."""
    torch.manual_seed(seed)
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    samples = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, prompt in enumerate(batch):
                prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                generated = output[row, inputs["input_ids"].shape[1] :].tolist()
                if tokenizer.eos_token_id in generated:  # keep the end of the text, drop the padding after it
                    generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
                samples.append({"prompt_ids": prompt_ids, "generated_ids": generated})
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return samples


@torch.no_grad()
def forward_kl_on_base_text(policy, base, samples: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean over the generated tokens of `KL(pi_base || pi_theta)` at each of their positions (full vocabulary)."""
    models = (policy, base)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    total_kl, total_tokens = 0.0, 0
    try:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            ids = [torch.tensor(s["prompt_ids"] + s["generated_ids"]) for s in batch]
            input_ids = pad(ids, padding_value=pad_id)
            attention_mask = pad([torch.ones_like(i) for i in ids], padding_value=0)
            # Prediction t scores token t + 1: the generated tokens are scored from the last prompt position on
            scored = torch.zeros_like(input_ids[:, 1:], dtype=torch.bool)
            for row, sample in enumerate(batch):
                first = len(sample["prompt_ids"]) - 1
                scored[row, first : first + len(sample["generated_ids"])] = True
            policy_logps, base_logps = (
                m(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float().log_softmax(-1)
                for m in models
            )
            kl = (base_logps.exp() * (base_logps - policy_logps)).sum(-1)
            total_kl += kl[scored].sum().item()
            total_tokens += int(scored.sum())
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return total_kl / max(total_tokens, 1)
