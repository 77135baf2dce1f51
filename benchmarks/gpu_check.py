"""The GPU check, one command for the day a GPU is available: what the QLoRA recipes cost on it, and that they run.

    make gpu-check                                 # one GPU: Qwen2-7B's shape, about 4 min on one H200
    python benchmarks/gpu_check.py --device cpu    # the same script on a tiny shape (the test suite runs it)
    python3 benchmarks/gpu_kit.py run --output DIR # on a GPU machine without a package index: `gpu_kit.py`

Nothing is downloaded: the model is Qwen2-7B's architecture (`model_shapes.SHAPES`) built with random weights (on a
CPU: its widths divided by 4, one layer, a 32nd of its vocabulary), quantized to 4-bit NF4 at load, computing in
bf16 on the GPU (float32 on a CPU). One results file, `benchmarks/results/gpu_check_<device>.json` and its `.md`,
written again after each part, so that a run cut short (`--time_box`, or the machine taken back) keeps what it
measured; a part cut by the box or failed says so in both, and the exit code is 1:

- peak `torch.cuda.max_memory_allocated` (peak RSS on a CPU) and step time of plain SFT, the adapters-disabled
  reference, a separate copy and the precomputed reference, and the default (`precompute_ref_log_probs="auto"`),
  with `reference_cost.py`'s measurement: step times interleaved in one process, each peak in a process of its own
  (those five side by side, each reading its own peak);
- the start-of-run check's layout noise on that device (`reference_check_noise.layout_differences`), against the
  tolerance the check applies to precomputed values;
- 20 steps (2 on a CPU) of the Qwen2-7B QLoRA recipe through `minorsft-trl train`, with the model swapped for the
  random one and the data for synthetic token ids.

On a machine without a GPU, `--device cuda` (the default) says so in one line and exits with code 2.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from model_shapes import describe_shape, scaled_shape, synthetic_examples
from reference_cost import build_trainer, run_worker

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
    from reference_check_noise import layout_differences

    from minorsft_trl.precision import half_precision
    from minorsft_trl.reference.check import deviation_tolerance

    trainer = build_trainer("minor_sft adapter-disabled", "qlora", {**spec, "steps": spec["layout_examples"]})
    largest = layout_differences(trainer, spec["layout_examples"]).abs().max().item()
    half = half_precision(trainer.accelerator, trainer.model, trainer.reference)
    return {"layout_noise": largest, "tolerance": deviation_tolerance(half, same_batch=False)}


def run_recipe(spec: dict, device: str, scratch: str, timeout: float) -> dict:
    """`minorsft-trl train` on the recipe, with the random model and synthetic token ids, for `recipe_steps` steps;
    killed with whatever it started past `timeout` seconds."""
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
    # The module, not the console script beside the interpreter: the kit installs with `--target`, without one
    command = [sys.executable, "-m", "minorsft_trl.cli", "train", "--config", RECIPE, *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    begin = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=scratch,
                               start_new_session=True)  # fmt: skip
        try:
            returncode = run.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)  # the launcher's training process too
            run.wait()
            raise
        seconds = time.perf_counter() - begin
        if returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.read()[-4000:]}")
    state = json.loads((Path(scratch) / "recipe-run" / "trainer_state.json").read_text())
    losses = [log["loss"] for log in state["log_history"] if "loss" in log]
    deviations = [log["deviation"] for log in state["log_history"] if "deviation" in log]
    return {"steps": state["global_step"], "seconds": seconds, "first_loss": losses[0], "last_loss": losses[-1],
            "first_deviation": deviations[0]}  # fmt: skip


def parts(device: str, spec: dict, config: dict):
    """The check's parts in the order they run, as groups of `(name, run)`, `run(timeout)` giving the part's result:
    the model first (every part needs it), then the step times alone on the device, then the peaks of memory (one
    process per mode, `torch.cuda.max_memory_allocated` of each its own) and the layout noise side by side, then the
    recipe, the one part that is not a measurement."""
    settings = SETTINGS[device]
    yield [("model", lambda timeout: run_worker("build", {**spec, "config": config}, timeout=timeout))]
    timing = {**spec, "quantization": "qlora", "steps": settings["rounds"], "warmup": settings["warmup"]}
    yield [("step times", lambda timeout: run_worker("time", timing, timeout=timeout))]
    side_by_side = []
    for mode in MODES:
        memory = {**spec, "quantization": "qlora", "mode": mode, "steps": settings["memory_steps"]}
        side_by_side.append(
            (f"memory | {mode}", lambda timeout, memory=memory: run_worker("memory", memory, timeout=timeout))
        )
    side_by_side.append(("layout", lambda timeout: run_worker("layout", spec, script=__file__, timeout=timeout)))
    yield side_by_side
    yield [("recipe", lambda timeout: run_recipe(spec, device, spec["scratch"], timeout))]


def run_part(name: str, run, results: dict, deadline: float) -> None:
    """`run` within what is left before `deadline`, its result (or that it was cut, or how it failed) in
    `results`."""
    begin = time.monotonic()
    try:
        value = run(deadline - begin if math.isfinite(deadline) else None)
    except subprocess.TimeoutExpired:
        results["cut"].append(name)
    except RuntimeError as error:  # the worker's traceback: kept, and the other parts still run
        results["failed"][name] = str(error)[-4000:]
        print(f"{name} failed:\n{str(error)[-4000:]}", flush=True)
    else:
        if name.startswith("memory | "):
            results["memory"][name.removeprefix("memory | ")] = value
        else:
            results[name] = value
    results["seconds"][name] = time.monotonic() - begin
    print(f"{name}: {results['seconds'][name]:.0f} s", flush=True)


def check(device: str, output: Path, time_box: float) -> bool:
    """Run every part within `time_box` seconds, writing the results (`output` and its table beside it) after each
    group of parts; whether every part ran and passed."""
    deadline = time.monotonic() + time_box
    settings = SETTINGS[device]
    config = scaled_shape(SHAPE, settings["width_divisor"], settings["num_layers"], settings["vocab_divisor"])
    results = {"shape": describe_shape(SHAPE, config), "settings": settings, "time_box_seconds": time_box,
               "seconds": {}, "memory": {}, "cut": [], "failed": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        spec = {
            "shape": SHAPE, "device": device, "vocab_size": config["vocab_size"], "gradient_checkpointing": False,
            "scratch": scratch, "model_path": os.path.join(scratch, "model"), "modes": MODES, **settings,
        }  # fmt: skip
        print(f"{results['shape']}: with random weights on {device}, a {time_box:.0f} s time box", flush=True)
        for group in parts(device, spec, config):
            if time.monotonic() >= deadline or "model" not in results and group[0][0] != "model":
                results["cut"] += [name for name, _ in group]
                continue
            print(f"{', '.join(name for name, _ in group)} ...", flush=True)
            with ThreadPoolExecutor(len(group)) as pool:
                for future in [pool.submit(run_part, name, run, results, deadline) for name, run in group]:
                    future.result()
            write(results, device, output)
    write(results, device, output)
    return not results["cut"] and not results["failed"]


def write(results: dict, device: str, output: Path) -> None:
    """The results as they stand, in `output` and as a table in the `.md` beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    output.with_suffix(".md").write_text(table(results, device) + "\n")


def table(results: dict, device: str) -> str:
    """What was measured so far, as Markdown; a part not measured says why."""

    def missing(name: str) -> str:
        return "failed" if name in results["failed"] else "cut by the time box" if name in results["cut"] else ""

    settings = results["settings"]
    model = results.get("model")
    on_cuda = device == "cuda"
    memory_title, memory_key = ("peak GPU (MB)", "peak_gpu_mb") if on_cuda else ("peak RSS (MB)", "peak_rss_mb")
    lines = [
        f"GPU check on {model['device_name'] if model else device}: {results['shape']}"
        + (f", {model['num_parameters'] / 1e6:.0f}M parameters" if model else "")
        + f", random weights, 4-bit NF4 ({'bf16' if on_cuda else 'float32'} compute), LoRA r=16 on all "
        f"linear layers, batch {settings['batch_size']} of {settings['prompt_length']} + "
        f"{settings['completion_length']} tokens, gradient checkpointing off. Step time: median of "
        f"{settings['rounds'] - settings['warmup']} interleaved rounds after {settings['warmup']}; peak memory: one "
        f"process per mode (side by side), {settings['memory_steps']} steps of `train()`.",
        "",
        f"| mode | s/step | x sft | {memory_title} | one-off precompute (s) |",
        "|---|---|---|---|---|",
    ]
    times = results.get("step times", {})
    for mode in MODES:
        timed, peak = times.get(mode), results["memory"].get(mode)
        cells = [
            f"{timed['step_seconds']:.3f}" if timed else missing("step times"),
            f"{timed['ratio_to_sft']:.2f}" if timed else "",
            f"{peak[memory_key]:.0f}" if peak else missing(f"memory | {mode}"),
            f"{timed['precompute_seconds']:.1f}" if timed and timed["precompute_seconds"] else "",
        ]
        lines.append(f"| {mode} | {' | '.join(cells)} |")
    lines.append("")
    if layout := results.get("layout"):
        lines.append(
            f"Start-of-run check, layout noise (largest |log-ratio per answer token| of one example, batch of 8 "
            f"against 3 + 5, {settings['layout_examples']} examples): {layout['layout_noise']:.3g}, tolerance for "
            f"precomputed values {layout['tolerance']:g}."
        )
    else:
        lines.append(f"Start-of-run check, layout noise: {missing('layout') or 'not run'}.")
    if recipe := results.get("recipe"):
        lines.append(
            f"{RECIPE} through `minorsft-trl train`: {recipe['steps']} steps in {recipe['seconds']:.0f} s, loss "
            f"{recipe['first_loss']:.4g} -> {recipe['last_loss']:.4g}, deviation at the first step "
            f"{recipe['first_deviation']:g}."
        )
    else:
        lines.append(f"{RECIPE} through `minorsft-trl train`: {missing('recipe') or 'not run'}.")
    seconds = ", ".join(f"{name} {value:.0f} s" for name, value in results["seconds"].items())
    lines += ["", f"Wall time of each part: {seconds or 'none ran'} (time box {results['time_box_seconds']:.0f} s)."]
    if results["cut"]:
        lines.append(f"Cut by the time box: {', '.join(results['cut'])}.")
    if results["failed"]:
        lines.append(f"Failed (tracebacks in the JSON): {', '.join(results['failed'])}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(SETTINGS), default="cuda")
    parser.add_argument("--output", help="(default: benchmarks/results/gpu_check_<device>.json)")
    parser.add_argument(
        "--time_box", type=float, default=float("inf"), help="seconds for every part together (default: no limit)"
    )
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
    output = Path(cli.output or f"benchmarks/results/gpu_check_{cli.device}.json")
    complete = check(cli.device, output, cli.time_box)
    print("\n" + output.with_suffix(".md").read_text())
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
