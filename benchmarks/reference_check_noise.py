"""What the start-of-run reference check must tolerate, and what it must catch, in float32 and under bf16 autocast.

For one model and a few dozen BIG-bench examples, the largest `|log-ratio per answer token|` of one example between
the policy before its first update and its reference (what `MinorSFTTrainer`'s check measures):

- noise, on the same batch (the reference on the fly): an identity adapter (LoRA, DoRA) against its disabled base, and
  LoRA with a bf16 trained copy of the LM head (what TRL makes of `modules_to_save=["lm_head"]` under QLoRA) against
  the float32 head;
- noise, between batch layouts (the precompute pass): the same reference on a batch of 8 and on batches of 3 + 5;
- a wrong reference: PiSSA, whose disabled base is not the model the policy starts from.

`reference.check.deviation_tolerance` must sit above the noise and below the wrong reference.

    .venv/bin/python benchmarks/reference_check_noise.py   # embedded SmolLM2-135M-Instruct, 64 examples, ~2 min
"""

import argparse
import os
import time

import torch
from accelerate.state import AcceleratorState
from peft import LoraConfig
from transformers import AutoTokenizer

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer
from minorsft_trl.data import bigbench
from minorsft_trl.data.embedded import resolve_model
from minorsft_trl.examples import ExampleIndex
from minorsft_trl.reference.check import deviation_tolerance
from minorsft_trl.reference.precompute import ReferencePrecompute

ADAPTERS = {
    "LoRA": dict(),
    "DoRA": dict(use_dora=True),
    "LoRA, bf16 LM head copy": dict(modules_to_save=["lm_head"]),
    "PiSSA (wrong reference)": dict(init_lora_weights="pissa_niter_4"),
}


def batches(trainer: MinorSFTTrainer, num_examples: int, size: int):
    rows = trainer.train_dataset
    for start in range(0, num_examples, size):
        yield [rows[i] for i in range(start, min(start + size, num_examples))]


def same_batch_log_ratios(trainer: MinorSFTTrainer, num_examples: int) -> torch.Tensor:
    """The check's log-ratios per answer token, with the reference scoring the very batch (on the fly)."""
    ratios = []
    for rows in batches(trainer, num_examples, 8):
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        index = ExampleIndex.from_batch(batch["labels"], batch.get("position_ids"))
        with trainer.accelerator.autocast():
            ref_logps = trainer.reference.logps(batch, index)
            ratios.append(trainer.reference.start_log_ratios(trainer.model, batch, index, ref_logps).float().cpu())
    return torch.cat(ratios)


def layout_differences(trainer: MinorSFTTrainer, num_examples: int) -> torch.Tensor:
    """`delta log-prob / answer length` per example between a batch of 8 and batches of 3 + 5."""
    differences = []
    precompute = ReferencePrecompute(trainer, reference_identity=None)
    for rows in batches(trainer, num_examples, 8):
        together, num_tokens = precompute.batch_ref_logps(trainer.data_collator(rows))
        apart = torch.cat(
            [precompute.batch_ref_logps(trainer.data_collator(rows[:3]))[0],
             precompute.batch_ref_logps(trainer.data_collator(rows[3:]))[0]]
        )  # fmt: skip
        differences.append((together - apart) / num_tokens)
    return torch.cat(differences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--task", default="unit_conversion/si_conversion")
    parser.add_argument("--num_examples", type=int, default=64)
    args = parser.parse_args()
    model_path = resolve_model(args.model)
    data = bigbench.load_splits(args.task, test_size=100)["train"].select(range(args.num_examples))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    print(f"{args.model}, {args.num_examples} examples of {args.task}: largest |log-ratio per answer token| (mean)")
    print(f"| {'case':<40} | {'float32':>18} | {'bf16 autocast':>18} |")
    print(f"|{'-' * 42}|{'-' * 20}|{'-' * 20}|")
    for name, settings in {**ADAPTERS, "LoRA, between batch layouts": {}}.items():
        cells = []
        for precision in ("no", "bf16"):
            started = time.perf_counter()
            AcceleratorState._reset_state(True)
            os.environ["ACCELERATE_MIXED_PRECISION"] = precision  # what `accelerate launch --mixed_precision` sets
            trainer = MinorSFTTrainer(
                model_path,
                args=MinorSFTConfig(
                    "outputs/reference-check-noise", use_cpu=True, bf16=False, report_to=[], max_length=512,
                    eval_drift=False,
                ),
                train_dataset=data,
                processing_class=tokenizer,
                peft_config=LoraConfig(r=8, target_modules="all-linear", **settings),
            )  # fmt: skip
            if "bf16 LM head copy" in name:  # as `SFTTrainer` casts every trained parameter of a quantized model
                for param_name, param in trainer.model.named_parameters():
                    if "modules_to_save" in param_name:
                        param.data = param.data.to(torch.bfloat16)
            if "between batch layouts" in name:
                values = layout_differences(trainer, args.num_examples)
            else:
                values = same_batch_log_ratios(trainer, args.num_examples)
            cells.append(f"{values.abs().max().item():.2g} ({values.mean().item():.2g})")
            print(f"  ({name}, autocast {precision}: {time.perf_counter() - started:.0f} s)", flush=True)
        print(f"| {name:<40} | {cells[0]:>18} | {cells[1]:>18} |", flush=True)
    print(
        "Tolerances: on the same batch "
        f"{deviation_tolerance(False, same_batch=True):g} / {deviation_tolerance(True, same_batch=True):g}, between "
        f"layouts {deviation_tolerance(False, same_batch=False):g} / {deviation_tolerance(True, same_batch=False):g} "
        "(float32 / half precision)."
    )


if __name__ == "__main__":
    main()
