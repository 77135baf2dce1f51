"""How far batch layout alone moves the reference's log-probs: the float noise the reference check must tolerate.

The same examples are scored by the same reference in two layouts, one batch of 8 and batches of 3 and 5 (other
padding, other rows alongside), as a precompute pass and a training batch may see them. Prints the largest
per-example difference per answer token, in float32 and under bfloat16 autocast; `reference_check.deviation_tolerance`
must sit above it with a margin, and well below what a wrong reference gives (tenths of a nat and more).

    .venv/bin/python benchmarks/layout_noise.py   # embedded SmolLM2-135M-Instruct, 64 BIG-bench examples, ~1 min
"""

import argparse
import os

import torch
from accelerate.state import AcceleratorState
from peft import LoraConfig
from transformers import AutoTokenizer

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer, bigbench
from minorsft_trl.embedded import resolve_model


def largest_layout_difference(trainer: MinorSFTTrainer, num_examples: int) -> float:
    """The largest `|delta log-prob| / answer length` of one example between a batch of 8 and batches of 3 + 5."""
    rows = trainer.train_dataset
    collate = trainer.data_collator
    largest = 0.0
    for start in range(0, num_examples, 8):
        batch = [rows[i] for i in range(start, start + 8)]
        together, num_tokens = trainer._batch_ref_logps(collate(batch))
        apart = torch.cat(
            [trainer._batch_ref_logps(collate(batch[:3]))[0], trainer._batch_ref_logps(collate(batch[3:]))[0]]
        )
        largest = max(largest, ((together - apart) / num_tokens).abs().max().item())
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--task", default="unit_conversion/si_conversion")
    parser.add_argument("--num_examples", type=int, default=64, help="A multiple of 8.")
    args = parser.parse_args()
    model_path = resolve_model(args.model)
    data = bigbench.load_splits(args.task, test_size=100)["train"].select(range(args.num_examples))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(True)
        os.environ["ACCELERATE_MIXED_PRECISION"] = precision  # what `accelerate launch --mixed_precision` sets
        trainer = MinorSFTTrainer(
            model_path,
            args=MinorSFTConfig("outputs/layout-noise", use_cpu=True, bf16=False, report_to=[], max_length=512),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, target_modules="all-linear"),
        )
        difference = largest_layout_difference(trainer, args.num_examples)
        print(f"autocast {precision}: largest |delta log-prob per answer token| between layouts: {difference:.3g}")


if __name__ == "__main__":
    main()
