"""The GPU check, one command for the day a GPU is available: what the QLoRA recipes cost on it, and that they run.

    make gpu-check                                 # one GPU: Qwen2-7B's shape, ~8 min on one 80-140 GB GPU
    python benchmarks/gpu_check.py --device cpu    # the same script on a tiny shape (the test suite runs it)

Nothing is downloaded: the model is Qwen2-7B's architecture (`model_shapes.SHAPES`) built with random weights (on a
CPU: its widths divided by 4, one layer, a 32nd of its vocabulary), quantized to 4-bit NF4 at load, computing in
bf16 on the GPU (float32 on a CPU). One results file, `benchmarks/results/gpu_check_<device>.json` and its `.md`:

- peak `torch.cuda.max_memory_allocated` (peak RSS on a CPU) and step time of plain SFT, the adapters-disabled
  reference, a separate copy and the precomputed reference, and the default (`precompute_ref_log_probs="auto"`),
  with `reference_cost.py`'s measurement: step times interleaved in one process, each peak in a process of its own;
- the start-of-run check's layout noise on that device (`reference_check_noise.layout_differences`), against the
  tolerance the check applies to precomputed values;
- 20 steps (2 on a CPU) of the Qwen2-7B QLoRA recipe through `minorsft-trl train`, with the model swapped for the
  random one and the data for synthetic token ids.

On a machine without a GPU, `--device cuda` (the default) says so in one line and exits with code 2.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model_shapes import describe_shape, scaled_shape, synthetic_examples
from reference_check_noise import layout_differences
from reference_cost import build_trainer, markdown_table, measure_all_modes, run_worker

SHAPE = "Qwen2-7B"
RECIPE = "Qwen2-7B-Instruct/minor_sft/config_qlora"
MODES = ["sft", "minor_sft adapter-disabled", "minor_sft separate copy", "minor_sft precomputed", "minor_sft default"]
# What each device runs: the full shape on a GPU, a tiny one (4-bit layer widths bitsandbytes' CPU paths accept) on a
# CPU, so that every line but the device's is tested where there is no GPU
SETTINGS = {
    "cuda": dict(width_divisor=1, num_layers=None, vocab_divisor=1, prompt_length=256, completion_length=256,
                 batch_size=4, rounds=8, warmup=2, memory_steps=4, recipe_steps=20, layout_examples=32),
    "cpu": dict(width_divisor=4, num_layers=1, vocab_divisor=32, prompt_length=16, completion_length=16,
                batch_size=4, rounds=3, warmup=1, memory_steps=1, recipe_steps=2, layout_examples=8),
}  # fmt: skip


def measure_layout_noise(spec: dict) -> dict:
    """The largest per-example difference of the reference's log-probs per answer token between a batch of 8 and
    batches of 3 + 5, under the training precision, and the tolerance the start-of-run check applies to it."""
    from minorsft_trl.reference_check import deviation_tolerance

    trainer = build_trainer("minor_sft adapter-disabled", "qlora", {**spec, "steps": spec["layout_examples"]})
    largest = layout_differences(trainer, spec["layout_examples"]).abs().max().item()
    return {"layout_noise": largest, "tolerance": deviation_tolerance(trainer._half_precision(), same_batch=False)}


def run_recipe(spec: dict, device: str, scratch: str) -> dict:
    """`minorsft-trl train` on the recipe, with the random model and synthetic token ids, for `recipe_steps` steps."""
    data = Path(scratch) / "data.jsonl"
    examples = synthetic_examples(
        spec["batch_size"] * spec["recipe_steps"], spec["prompt_length"], spec["completion_length"], spec["vocab_size"]
    )
    examples.to_json(data)
    overrides = [
        "--model_name_or_path", spec["model_path"], "--dataset_name", str(data), "--assistant_only_loss", "false",
        "--max_length", str(spec["prompt_length"] + spec["completion_length"]),
        "--max_steps", str(spec["recipe_steps"]),
        "--per_device_train_batch_size", str(spec["batch_size"]), "--gradient_accumulation_steps", "1",
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
        "--output_dir", str(Path(scratch) / "recipe-run"), "--ref_cache_dir", str(Path(scratch) / "ref-cache"),
    ]  # fmt: skip
    if device == "cpu":
        overrides += ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32"]
    command = [str(Path(sys.executable).parent / "minorsft-trl"), "train", "--config", RECIPE, *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    begin = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=scratch)
    seconds = time.perf_counter() - begin
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-4000:]}")
    state = json.loads((Path(scratch) / "recipe-run" / "trainer_state.json").read_text())
    losses = [log["loss"] for log in state["log_history"] if "loss" in log]
    deviations = [log["deviation"] for log in state["log_history"] if "deviation" in log]
    return {"steps": state["global_step"], "seconds": seconds, "first_loss": losses[0], "last_loss": losses[-1],
            "first_deviation": deviations[0]}  # fmt: skip


def check(device: str) -> tuple[dict, str]:
    settings = SETTINGS[device]
    config = scaled_shape(SHAPE, settings["width_divisor"], settings["num_layers"], settings["vocab_divisor"])
    with tempfile.TemporaryDirectory() as scratch:
        spec = {
            "shape": SHAPE, "device": device, "vocab_size": config["vocab_size"], "gradient_checkpointing": False,
            "scratch": scratch, "model_path": os.path.join(scratch, "model"), "modes": MODES, **settings,
        }  # fmt: skip
        print(f"{describe_shape(SHAPE, config)}: building it with random weights on {device} ...", flush=True)
        model = run_worker("build", {**spec, "config": config})
        cli = argparse.Namespace(
            quantizations=["qlora"], **{k: settings[k] for k in ("rounds", "warmup", "memory_steps")}
        )
        costs = measure_all_modes(spec, cli)
        print("layout noise of the start-of-run check ...", flush=True)
        noise = run_worker("layout", spec, script=__file__)
        print(f"{settings['recipe_steps']} steps of {RECIPE} through minorsft-trl train ...", flush=True)
        recipe = run_recipe(spec, device, scratch)
    memory = ("peak GPU (MB)", "peak_gpu_mb") if device == "cuda" else ("peak RSS (MB)", "peak_rss_mb")
    columns = [
        ("mode", lambda result, _: result["mode"]),
        ("s/step", lambda result, _: f"{result['step_seconds']:.3f}"),
        ("x sft", lambda result, _: f"{result['ratio_to_sft']:.2f}"),
        (memory[0], lambda result, _: f"{result[memory[1]]:.0f}"),
        ("one-off precompute (s)", lambda r, _: f"{r['precompute_seconds']:.1f}" if r["precompute_seconds"] else ""),
    ]
    caption = (
        f"GPU check on {model['device_name']}: {describe_shape(SHAPE, config)}, "
        f"{model['num_parameters'] / 1e6:.0f}M parameters, random weights, 4-bit NF4 "
        f"({'bf16' if device == 'cuda' else 'float32'} compute), LoRA r=16 on all linear layers, batch "
        f"{settings['batch_size']} of {settings['prompt_length']} + {settings['completion_length']} tokens."
    )
    table = "\n".join([
        markdown_table(caption, costs, columns),
        "",
        f"Start-of-run check, layout noise (largest |log-ratio per answer token| of one example, batch of 8 against "
        f"3 + 5): {noise['layout_noise']:.3g}, tolerance for precomputed values {noise['tolerance']:g}.",
        f"{RECIPE} through `minorsft-trl train`: {recipe['steps']} steps in {recipe['seconds']:.0f} s, loss "
        f"{recipe['first_loss']:.4g} -> {recipe['last_loss']:.4g}, deviation at the first step "
        f"{recipe['first_deviation']:g}.",
    ])  # fmt: skip
    return {"model": model, "costs": costs, "layout": noise, "recipe": recipe}, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(SETTINGS), default="cuda")
    parser.add_argument("--output", help="(default: benchmarks/results/gpu_check_<device>.json)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        print(json.dumps(measure_layout_noise(json.loads(cli.worker[1]))))
        return 0
    if cli.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA GPU on this machine; run it where there is one (--device cpu: the tiny CPU run)."
            )
            return 2
    results, table = check(cli.device)
    output = Path(cli.output or f"benchmarks/results/gpu_check_{cli.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    output.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
