"""What a separate reference costs in memory per process under each engine: full fine-tuning of the embedded
SmolLM2-135M-Instruct with Minor SFT (the frozen copy of the policy is the reference), 2 processes on the CPU.

    python benchmarks/engine_memory.py                      # ddp, zero2, zero3: about 3 minutes on 2 CPU cores
    python benchmarks/engine_memory.py --engines zero3

Each engine is one `accelerate launch` of the shipped config (`--num_processes 2 --mixed_precision no`, the recipe's
`use_cpu: true`) running the generic training script (`minorsft_trl.cli.train.main`) for 2 steps on the
recipe's data, with the reference on the fly (so it stays for the run). Each process then reports the bytes of the
reference's and the policy's parameters it holds between forwards (`minorsft_trl.engines.parameter_bytes`: a ZeRO-3
shard, plus the parameters DeepSpeed keeps whole below its persistence threshold) and its peak resident set size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "SmolLM2-135M-Instruct" / "minor_sft" / "config_lora.yaml"
ENGINES = ("ddp", "zero2", "zero3")
# Full fine-tuning, the frozen copy kept for the run, two steps, no evaluation
OVERRIDES = ["--use_peft", "false", "--precompute_ref_log_probs", "false", "--max_steps", "2"]
OVERRIDES += ["--eval_strategy", "no", "--save_strategy", "no", "--per_device_train_batch_size", "4"]


def worker(argv: list[str], report_dir: Path) -> None:
    """In each launched process: train as the generic script does, then write what this process holds."""
    from minorsft_trl.engines import parameter_bytes
    from minorsft_trl.scripts import minor_sft

    trainer = minor_sft.main(*minor_sft.make_parser().parse_args_and_config(argv))
    policy = parameter_bytes(trainer.accelerator.unwrap_model(trainer.model))
    reference = parameter_bytes(trainer.accelerator.unwrap_model(trainer.ref_model))
    report = {
        "reference_held": reference[0],
        "reference_whole": reference[1],
        "policy_held": policy[0],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (report_dir / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report))


def launch(engine: str, work_dir: Path) -> tuple[list[dict], float]:
    report_dir = work_dir / engine
    report_dir.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / f"{engine}.yaml"),
        "--num_processes", "2", "--mixed_precision", "no",
        __file__, "--worker", str(report_dir),
        "--config", str(RECIPE), *OVERRIDES, "--output_dir", str(report_dir / "out"),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - started
    return [json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in range(2)], seconds


def mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[3:], Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    engines = parser.parse_args().engines
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        for engine in engines:
            reports, seconds = launch(engine, Path(work_dir))
            rows.append((engine, reports, seconds))
    print("\n| engine | reference held per process (MiB) | of the whole reference | policy held per process | "
          "peak RSS per process (MiB) | launch (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for engine, reports, seconds in rows:
        per_process = {key: " / ".join(mib(report[key]) for report in reports) for key in reports[0]}
        print(
            f"| {engine} | {per_process['reference_held']} | {mib(reports[0]['reference_whole'])} | "
            f"{per_process['policy_held']} | {per_process['peak_rss']} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
