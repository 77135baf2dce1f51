"""What the reference costs: seconds per optimizer step and peak memory of Minor SFT against plain SFT.

    python benchmarks/reference_cost.py            # LoRA and QLoRA, about 15 minutes on 2 CPU cores
    python benchmarks/reference_cost.py --rounds 10 --quantizations lora

On the embedded SmolLM2-135M-Instruct and BIG-bench si_conversion, with the same data, batches and seed:

- `sft`: plain SFT (`loss_type="nll"`), the baseline;
- `minor_sft adapter-disabled`: the reference is the policy with its adapters disabled (one extra no-grad forward);
- `minor_sft separate copy`: a second, frozen copy of the base model as the reference;
- `minor_sft precomputed`: reference log-probs computed once before training (timed apart), none during training.

Step time: one process per quantization builds the four trainers and runs their optimizer steps interleaved
(sft, adapter-disabled, separate, precomputed, sft, ...) on the same batches, so that the drift of a shared machine
(which moves step times by +-20% within minutes here) hits every mode alike; each mode's ratio is the median over
rounds of its step time divided by the sft step of the same round. Peak memory: one fresh process per mode trains a
few steps and reports its peak resident set size during `train()` (reset after loading).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODES = {
    "sft": {"loss_type": "nll"},
    "minor_sft adapter-disabled": {"loss_type": "minor_sft"},
    "minor_sft separate copy": {"loss_type": "minor_sft", "separate_reference": True},
    "minor_sft precomputed": {"loss_type": "minor_sft", "precompute_ref_log_probs": True},
}


def build_trainer(mode: str, quantization: str, spec: dict):
    """The trainer of one mode: LoRA r=16 on every linear layer, batch `batch_size`, the same data and seed."""
    import torch
    from transformers import BitsAndBytesConfig
    from trl import ModelConfig, get_peft_config

    from minorsft_trl import MinorSFTConfig, MinorSFTTrainer, bigbench
    from minorsft_trl.embedded import resolve_model

    model_path = resolve_model("embedded:SmolLM2-135M-Instruct")
    train = bigbench.load_splits("unit_conversion/si_conversion", test_size=500)["train"]
    train = train.select(range(spec["batch_size"] * spec["steps"]))
    quantization_config = None
    if quantization == "qlora":
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    peft_config = get_peft_config(
        ModelConfig(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=["all-linear"])
    )
    settings = MODES[mode]
    output_dir = os.path.join(spec["scratch"], f"{quantization}-{mode.replace(' ', '-')}")
    args = MinorSFTConfig(
        output_dir=output_dir,
        loss_type=settings["loss_type"],
        beta=0.04,
        precompute_ref_log_probs=settings.get("precompute_ref_log_probs", False),
        ref_cache_dir=os.path.join(output_dir, "ref-cache"),  # empty: the precompute really runs
        ref_model_name_or_path=model_path if settings.get("separate_reference") else None,
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=5e-4,
        max_length=128,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        logging_steps=spec["steps"],
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    return MinorSFTTrainer(
        model_path, args=args, train_dataset=train, peft_config=peft_config, quantization_config=quantization_config
    )


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def measure_memory(spec: dict) -> dict:
    """Peak RSS while one mode trains (a fresh process: the peak is its own)."""
    trainer = build_trainer(spec["mode"], spec["quantization"], spec)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak: loading is not training
    trainer.train()
    return {"peak_rss_mb": peak_rss_mb()}


def measure_step_times(spec: dict) -> dict:
    """Every mode's optimizer steps, interleaved round by round on the same batches."""
    from minorsft_trl import MinorSFTTrainer

    precompute_seconds = {}
    original = MinorSFTTrainer._compute_ref_logps

    def timed(self, *args, **kwargs):
        begin = time.perf_counter()
        values = original(self, *args, **kwargs)
        precompute_seconds[self.args.output_dir] = time.perf_counter() - begin
        return values

    MinorSFTTrainer._compute_ref_logps = timed  # this process only measures
    trainers = {mode: build_trainer(mode, spec["quantization"], spec) for mode in MODES}
    steps = {}
    for mode, trainer in trainers.items():
        trainer.create_optimizer_and_scheduler(num_training_steps=spec["steps"])
        batches = iter(trainer.get_train_dataloader())

        def step(trainer=trainer, batches=batches):
            samples, num_items = trainer.get_batch_samples(batches, 1, trainer.args.device)
            trainer.training_step(trainer.model, samples[0], num_items)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad()

        steps[mode] = step
    seconds = {mode: [] for mode in MODES}
    for _ in range(spec["steps"]):
        for mode, step in steps.items():
            begin = time.perf_counter()
            step()
            seconds[mode].append(time.perf_counter() - begin)
    warm = slice(spec["warmup"], None)
    return {
        mode: {
            "step_seconds": statistics.median(seconds[mode][warm]),
            "ratio_to_sft": statistics.median(
                t / s for t, s in zip(seconds[mode][warm], seconds["sft"][warm], strict=True)
            ),
            "precompute_seconds": precompute_seconds.get(trainers[mode].args.output_dir, 0.0),
            "all_step_seconds": seconds[mode],
        }
        for mode in MODES
    }


def run_worker(task: str, spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run(
        [sys.executable, __file__, "--worker", task, json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise RuntimeError(f"{task} {spec} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="first rounds left out")
    parser.add_argument("--memory_steps", type=int, default=4, help="steps of each peak-memory run")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--quantizations", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--output", default="benchmarks/results/reference_cost.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        task, spec = cli.worker[0], json.loads(cli.worker[1])
        print(json.dumps((measure_memory if task == "memory" else measure_step_times)(spec)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for quantization in cli.quantizations:
            print(f"{quantization}: step times, {cli.rounds} interleaved rounds ...", flush=True)
            spec = {"quantization": quantization, "batch_size": cli.batch_size, "scratch": scratch}
            times = run_worker("time", {**spec, "steps": cli.rounds, "warmup": cli.warmup})
            for mode in MODES:
                print(f"{quantization}: peak memory of {mode} ...", flush=True)
                memory = run_worker("memory", {**spec, "mode": mode, "steps": cli.memory_steps})
                results[f"{quantization} | {mode}"] = {
                    "quantization": quantization,
                    "mode": mode,
                    **times[mode],
                    **memory,
                }

    lines = [
        f"Embedded SmolLM2-135M-Instruct, BIG-bench si_conversion, LoRA r=16 on all linear layers, batch "
        f"{cli.batch_size}, {os.cpu_count()} CPU threads. Step time: median of {cli.rounds - cli.warmup} interleaved "
        "rounds; `x sft`: median over rounds of the step time over the sft step of the same round. Peak RSS during "
        "`train()`, one process per mode.",
        "",
        "| quantization | mode | s/step | x sft | peak RSS (MB) | x sft | one-off precompute (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results.values():
        baseline = results[f"{result['quantization']} | sft"]
        precompute = f"{result['precompute_seconds']:.1f}" if result["precompute_seconds"] else ""
        lines.append(
            f"| {result['quantization']} | {result['mode']} | {result['step_seconds']:.2f} | "
            f"{result['ratio_to_sft']:.2f} | {result['peak_rss_mb']:.0f} | "
            f"{result['peak_rss_mb'] / baseline['peak_rss_mb']:.2f} | {precompute} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(os.path.dirname(cli.output), exist_ok=True)
    with open(cli.output, "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.splitext(cli.output)[0] + ".md", "w") as file:
        file.write(table + "\n")


if __name__ == "__main__":
    main()
