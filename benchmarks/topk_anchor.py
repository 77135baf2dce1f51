"""How many of the reference's tokens the cached KL anchor must keep: the KL coarsened to the reference's top-k tokens
and a rest bin, and the anchor with draws from the rest (`minorsft_trl.reference.topk_anchor`), against the
full-vocabulary KL, at the answer tokens of held-out data.

    python benchmarks/topk_anchor.py          # si_conversion and a chat set, ~15 min on 2 CPU cores
    python benchmarks/topk_anchor.py --runs topical_chat   # one of them, added to the results already there

Two `sft_kl` runs of the SmolLM2 recipe (LoRA, the full anchor on the fly): the main recipe's si_conversion, and
BIG-bench's `topical_chat` as conversations (the dialogue so far as alternating user / assistant turns, the next
reply as the assistant's answer; 160 of them, 20 steps, at max_length 256, truncated from the left). At a few steps
of each run (step 5, where the anchor starts to act, and the last)
the policy and its reference (adapters disabled) score the first held-out examples; per answer token, the full KL,
the coarsened KL for each k, and the anchor with `TAIL_SAMPLES` draws from the rest for each k. Reported per k: the
relative error of the mean coarsened KL against the full one (always <= 0: coarsening loses information), the same for
the anchor with draws (0 in expectation) and its per-token spread (the root mean square of its difference to the full
KL, relative to the full KL's mean), and the reference's mass outside its top-k (mean, 95th percentile, largest).
Results in `benchmarks/results/topk_anchor.json` and `.md`.
"""

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

from minorsft_trl.cli import train as minor_sft
from minorsft_trl.data import bigbench
from minorsft_trl.examples import ExampleIndex
from minorsft_trl.fused_head import labelled_positions_only
from minorsft_trl.reference.models import reference_mode
from minorsft_trl.reference.topk_anchor import reference_topk, topk_kl
from minorsft_trl.reference.vocabulary_kl import (
    answer_hidden_states,
    captured_hidden_states,
    lm_head_weights,
    token_kl,
)

RECIPE = "recipes/SmolLM2-135M-Instruct/sft_kl/config_lora.yaml"
KS = [1, 2, 4, 8, 16, 20, 32, 64, 128, 256, 512, 1024, 2048]
RUNS = ["si_conversion", "topical_chat"]
# Draws from the reference's rest per answer token: `ref_tail_samples`'s default
TAIL_SAMPLES = 32
# topical_chat's dialogues fill max_length 256: 160 training examples (20 steps) keep its run to about 10 minutes
CHAT_TRAIN = 160
# What the collated batches give the model (not the precomputed reference values of a run that has them)
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
# Where the turns of a topical_chat dialogue begin
_TURN = re.compile(r'agent_[AB]: "')


def chat_examples(count: int, offset: int) -> list[dict]:
    """`count` topical_chat examples from `offset` on, as conversational prompt-completion: the dialogue's turns
    alternate between user and assistant, ending with a user turn, and the reply is the assistant's."""
    rows = bigbench.load_splits("topical_chat", test_size=200)["train"].select(range(offset, offset + count))
    examples = []
    for row in rows:
        turns = [turn.strip().rstrip('"').strip() for turn in _TURN.split(row["prompt"]) if turn.strip()]
        roles = ["user" if (len(turns) - i) % 2 else "assistant" for i in range(len(turns))]
        prompt = [{"role": role, "content": turn} for role, turn in zip(roles, turns, strict=True)]
        reply = row["completion"].strip().strip('"')
        examples.append({"prompt": prompt, "completion": [{"role": "assistant", "content": reply}]})
    return examples


class AnchorError(TrainerCallback):
    """At the given steps, the full and the coarsened KL of the first `num_examples` held-out examples (the eval
    dataloader the run's evaluation at step 0, `eval_on_start`, made)."""

    def __init__(self, steps: list[int], num_examples: int, results: dict, name: str):
        self.steps, self.num_examples, self.results, self.name = steps, num_examples, results, name

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None, **kwargs):
        if state.global_step in self.steps:
            rows = [eval_dataloader.dataset[i] for i in range(min(self.num_examples, len(eval_dataloader.dataset)))]
            batches = [eval_dataloader.collate_fn(rows[start : start + 8]) for start in range(0, len(rows), 8)]
            self.results[f"{self.name}, step {state.global_step}"] = measure(model, batches)


@torch.no_grad()
def measure(policy, batches: list[dict]) -> dict:
    """Per k, the relative error of the coarsened KL's mean and of the drawn anchor's against the full KL's, the drawn
    anchor's per-token spread, and the reference's rest mass, on the answer tokens of `batches` (collated), the
    reference being `policy` (PEFT) with its adapters disabled."""
    full, coarse, drawn, rest = [], {k: [] for k in KS}, {k: [] for k in KS}, {k: [] for k in KS}
    generator = torch.Generator(next(policy.parameters()).device).manual_seed(0)
    device = next(policy.parameters()).device
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items() if key in MODEL_INPUTS}
        index = ExampleIndex.from_batch(batch["labels"], batch.get("position_ids"))
        answer_ids = batch["labels"][:, 1:][index.answer_mask]
        head = lm_head_weights(policy)
        with labelled_positions_only(), reference_mode(policy):
            with policy.disable_adapter(), captured_hidden_states(policy) as captured:
                policy(**batch, use_cache=False, fused_lm_head=True)
            ref_hidden = answer_hidden_states(captured[-1], index.answer_mask)
            with captured_hidden_states(policy) as captured:
                log_probs = policy(**batch, use_cache=False, fused_lm_head=True).log_probs
            hidden = answer_hidden_states(captured[-1], index.answer_mask)
        answer_logps = log_probs[:, -index.answer_mask.size(1) :][index.answer_mask]
        full.append(token_kl(hidden, head, ref_hidden, head))
        for k in KS:
            top = reference_topk(ref_hidden, head, k)
            coarse[k].append(topk_kl(hidden, head, answer_ids, answer_logps, top))
            rest[k].append(top.rest_logp.exp())
            with_draws = reference_topk(ref_hidden, head, k, TAIL_SAMPLES, generator)
            drawn[k].append(topk_kl(hidden, head, answer_ids, answer_logps, with_draws))
    full = torch.cat(full).double()
    report = {"tokens": full.numel(), "full_kl": full.mean().item(), "by_k": {}}
    for k in KS:
        values, masses = torch.cat(coarse[k]).double(), torch.cat(rest[k]).double()
        estimates = torch.cat(drawn[k]).double()
        report["by_k"][k] = {
            "coarsened_kl": values.mean().item(),
            "relative_error": (values.sum() / full.sum() - 1).item(),
            "drawn_relative_error": (estimates.sum() / full.sum() - 1).item(),
            "drawn_token_spread": ((estimates - full).square().mean().sqrt() / full.mean()).item(),
            "rest_mass_mean": masses.mean().item(),
            "rest_mass_p95": masses.quantile(0.95).item(),
            "rest_mass_max": masses.max().item(),
        }
    return report


def train(name: str, overrides: list[str], steps: list[int], num_examples: int, results: dict, scratch: str):
    """One `sft_kl` run of the recipe with `overrides`, measured at `steps`."""
    configs = minor_sft.parse_args(
        ["--config", RECIPE, *overrides, "--output_dir", os.path.join(scratch, name), "--save_strategy", "no",
         "--eval_strategy", "steps", "--eval_steps", "100000", "--precompute_ref_log_probs", "false",
         "--eval_drift", "false", "--report_to", "none", "--disable_tqdm", "true",
         "--max_eval_examples", str(num_examples), "--eval_on_start", "true"]
    )  # fmt: skip
    callback = AnchorError(steps, num_examples, results, name)
    minor_sft.main(*configs, callbacks=[callback])


def markdown(results: dict) -> str:
    lines = [
        "KL anchor coarsened to the reference's top-k tokens and a rest bin, against the full-vocabulary KL, per "
        "answer token of held-out examples (`python benchmarks/topk_anchor.py`): relative error of the mean "
        "(coarsened / full - 1, never above 0), and the reference's mass outside its top-k (mean / 95th percentile / "
        "largest).",
        "",
        "| run, step | tokens | full KL | " + " | ".join(f"k={k}" for k in KS) + " |",
        "|---|---|---|" + "---|" * len(KS),
    ]
    # JSON keys are text: the results read back from the file index k by its text
    results = {
        name: {**report, "by_k": {int(k): v for k, v in report["by_k"].items()}} for name, report in results.items()
    }
    for name, report in results.items():
        cells = [f"{report['by_k'][k]['relative_error']:+.2%}" for k in KS]
        lines.append(f"| {name} | {report['tokens']} | {report['full_kl']:.4f} | " + " | ".join(cells) + " |")
    if all("drawn_relative_error" in report["by_k"][KS[0]] for report in results.values()):
        lines += [
            "",
            f"With {TAIL_SAMPLES} draws from the rest (`ref_tail_samples`): relative error of the mean (0 in "
            "expectation) / per-token spread (root mean square of the difference to the full KL, over the full KL's "
            "mean):",
            "",
        ]
        lines += ["| run, step | " + " | ".join(f"k={k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
        for name, report in results.items():
            by_k = report["by_k"]
            cells = [f"{by_k[k]['drawn_relative_error']:+.2%} / {by_k[k]['drawn_token_spread']:.2f}" for k in KS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Reference's mass outside its top-k (mean / p95 / max):", ""]
    lines += ["| run, step | " + " | ".join(f"k={k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    for name, report in results.items():
        by_k = report["by_k"]
        cells = [
            f"{by_k[k]['rest_mass_mean']:.3g} / {by_k[k]['rest_mass_p95']:.3g} / {by_k[k]['rest_mass_max']:.3g}"
            for k in KS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=["si_conversion", "topical_chat"], default=RUNS)
    parser.add_argument("--num_examples", type=int, default=64, help="held-out examples measured")
    parser.add_argument("--output", default="benchmarks/results/topk_anchor.json")
    cli = parser.parse_args()
    output = Path(cli.output)
    # Each run's results join those already there, so that the runs can be measured one at a time
    results = json.loads(output.read_text()) if output.exists() else {}
    with tempfile.TemporaryDirectory() as scratch:
        if "si_conversion" in cli.runs:
            train("si_conversion", [], [5, 50], cli.num_examples, results, scratch)
        if "topical_chat" in cli.runs:
            chat = Path(scratch) / "chat"
            chat.mkdir()
            splits = {"train": (CHAT_TRAIN, 0), "test": (cli.num_examples, CHAT_TRAIN)}
            for split, (count, offset) in splits.items():
                (chat / f"{split}.jsonl").write_text("\n".join(json.dumps(e) for e in chat_examples(count, offset)))
            chat_run = ["--dataset_name", str(chat), "--max_length", "256", "--truncation_mode", "keep_end"]
            train("topical_chat", chat_run, [5, CHAT_TRAIN // 8], cli.num_examples, results, scratch)
    output.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    output.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
