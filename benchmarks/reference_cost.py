"""What the reference costs: seconds per optimizer step and peak memory of each reference-aware loss against plain SFT.

    python benchmarks/reference_cost.py            # LoRA and QLoRA, about 25 minutes on 2 CPU cores
    python benchmarks/reference_cost.py --rounds 10 --quantizations lora
    python benchmarks/reference_cost.py --quantizations lora --prompt_length 0 --completion_length 1024 --batch_size 2
                                                   # max_length 1024, every token an answer token: the KL's worst case
    python benchmarks/reference_cost.py --shape Qwen2-7B --device cpu   # Qwen2-7B scaled down, LoRA fp32, ~15 min
    python benchmarks/reference_cost.py --shape Qwen2-7B --device cuda  # Qwen2-7B full size, QLoRA 4-bit, one GPU

On the embedded SmolLM2-135M-Instruct and BIG-bench si_conversion, with the same data, batches and seed:

- `sft`: plain SFT (`loss_type="nll"`), the baseline;
- `minor_sft adapter-disabled`: the reference is the policy with its adapters disabled (one extra no-grad forward);
- `minor_sft separate copy`: a second, frozen copy of the base model as the reference;
- `minor_sft precomputed`: reference log-probs computed once before training (timed apart), none during training;
- `minor_sft default`: what a run gets without setting `precompute_ref_log_probs` ("auto": precomputed here);
- `asft`, `sft_kl` adapter-disabled: the exact KL anchor, adapters disabled: a reference forward whose hidden states go
  with the policy's through both LM heads in tiles (`minorsft_trl.reference.vocabulary_kl`), nothing cached;
- `asft`, `sft_kl` precomputed: the KL anchor from the reference's top `ref_top_k` tokens and `ref_tail_samples`
  draws from the rest (the defaults), computed once before training with the summed log-probs
  (`minorsft_trl.reference.topk_anchor`): no reference forward in training;
- `iw_sft`: importance weights from the adapter-disabled reference (the cost of `minor_sft`'s forward, another weight).

`--quantizations full` trains every weight (no adapter): there the reference of the `adapter-disabled` modes is a
frozen copy of the model, and `precomputed` releases it once the pass is done (`precompute_ref_log_probs=True`).
`--modes` measures some modes only (`sft` always).

With `--prompt_length` / `--completion_length` (no `--shape`), the embedded model trains on random token sequences of
those lengths instead of si_conversion: `--prompt_length 0 --completion_length 1024` is `max_length` 1024 with every
token an answer token, where the full-vocabulary KL costs the most.

Step time: one process per quantization builds the four trainers and runs their optimizer steps interleaved
(sft, adapter-disabled, separate, precomputed, sft, ...) on the same batches, so that the drift of a shared machine
(which moves step times by +-20% within minutes here) hits every mode alike; each mode's ratio is the median over
rounds of its step time divided by the sft step of the same round. Peak memory: one fresh process per mode trains a
few steps and reports its peak resident set size during `train()` (reset after loading).

With `--shape`, the model is a real architecture (`model_shapes.SHAPES`) built from its config with random weights
(step time and memory do not depend on the weights; nothing is downloaded), saved once and loaded by every trainer,
and the data are random token sequences of `--prompt_length` prompt and `--completion_length` completion tokens
(the loss on the completion). The precompute is reported per 1000 examples.

- `--device cuda`: the full-size model, bf16, quantized to 4-bit NF4 at load (QLoRA; `--quantizations lora` keeps
  the bf16 weights), on GPU 0. Step times are synchronized; peak memory is `torch.cuda.max_memory_allocated` during
  `train()` (reset after loading). The step-time process holds the four trainers at once, five 4-bit copies of the
  model (the separate copy has two): about 28 GB for Qwen2-7B before activations, so a GPU of 48 GB or more.
- `--device cpu` (the default without a GPU): the architecture scaled down (`--width_divisor`, `--num_layers`,
  `--vocab_divisor`; the header says what was scaled and by how much), fp32, peak RSS as above. The vocabulary is
  divided too by default: with the real one, the LM head of the narrowed model would hold most of its weights (70%
  for Qwen2-7B scaled down by default, against 8% at full size) and most of its step time.

The random model is saved under the temporary directory (`TMPDIR`): 15 GB for the full Qwen2-7B in bf16.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from model_shapes import SHAPES, describe_shape, save_random_model, scaled_shape, synthetic_examples

MODES = {
    "sft": {"loss_type": "nll"},
    "minor_sft adapter-disabled": {"loss_type": "minor_sft"},
    "minor_sft separate copy": {"loss_type": "minor_sft", "separate_reference": True},
    "minor_sft precomputed": {"loss_type": "minor_sft", "precompute_ref_log_probs": True},
    "minor_sft default": {"loss_type": "minor_sft", "precompute_ref_log_probs": "auto"},
    "asft adapter-disabled": {"loss_type": "asft"},
    "sft_kl adapter-disabled": {"loss_type": "sft_kl"},
    "asft precomputed": {"loss_type": "asft", "precompute_ref_log_probs": True},
    "sft_kl precomputed": {"loss_type": "sft_kl", "precompute_ref_log_probs": True},
    "iw_sft adapter-disabled": {"loss_type": "iw_sft"},
}
# What the command line leaves unset: for the embedded model, and for `--shape` on each device
DEFAULTS = {
    "embedded": {"quantizations": ["lora", "qlora"], "rounds": 20, "batch_size": 8},
    "cpu": {
        "quantizations": ["lora"],
        "rounds": 20,
        "batch_size": 4,
        "width_divisor": 4,
        "num_layers": 4,
        "vocab_divisor": 32,  # the real one would make the LM head 70% of the weights of the linear layers, not 8%
        "prompt_length": 128,
        "completion_length": 128,
        "gradient_checkpointing": False,
    },
    "cuda": {
        "quantizations": ["qlora"],
        "rounds": 20,
        "batch_size": 4,
        "width_divisor": 1,
        "num_layers": None,  # all
        "vocab_divisor": 1,
        "prompt_length": 256,
        "completion_length": 256,
        "gradient_checkpointing": False,
    },
}
# Options of `--shape` only (the embedded model takes `--prompt_length` / `--completion_length` for synthetic data)
SHAPE_OPTIONS = [
    name for name in DEFAULTS["cpu"] if name not in DEFAULTS["embedded"] and not name.endswith("_length")
] + ["device"]


def embedded_model_and_data(spec: dict) -> tuple[str, object, dict]:
    """The embedded SmolLM2-135M-Instruct, its first `batch_size * steps` si_conversion examples (or synthetic ones of
    `prompt_length` + `completion_length` tokens, when given), and their length."""
    from minorsft_trl.data import bigbench
    from minorsft_trl.data.embedded import resolve_model

    model_path = resolve_model("embedded:SmolLM2-135M-Instruct")
    if spec.get("completion_length"):
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model_path).vocab_size
        return shape_model_and_data({**spec, "vocab_size": vocab_size, "model_path": model_path})
    train = bigbench.load_splits("unit_conversion/si_conversion", test_size=500)["train"]
    return model_path, train.select(range(spec["batch_size"] * spec["steps"])), {"max_length": 128}


def shape_model_and_data(spec: dict) -> tuple[str, object, dict]:
    """The saved random model of `--shape`, `batch_size * steps` synthetic examples, and how to train on them."""
    length = spec["prompt_length"] + spec["completion_length"]
    train = synthetic_examples(
        spec["batch_size"] * spec["steps"], spec["prompt_length"], spec["completion_length"], spec["vocab_size"]
    )
    return spec["model_path"], train, {"max_length": length, "completion_only_loss": True}


def device_args(device: str) -> dict:
    """Training arguments of the device: fp32 on CPU; bf16 on CUDA, the model loaded on GPU 0."""
    if device == "cuda":
        return {"use_cpu": False, "bf16": True, "model_init_kwargs": {"dtype": "bfloat16", "device_map": {"": 0}}}
    return {"use_cpu": True, "bf16": False}


def build_trainer(mode: str, quantization: str, spec: dict):
    """The trainer of one mode: LoRA r=16 on every linear layer, batch `batch_size`, the same data and seed."""
    import torch
    from transformers import BitsAndBytesConfig
    from trl import ModelConfig, get_peft_config

    from minorsft_trl import MinorSFTConfig, MinorSFTTrainer

    model_path, train, data_args = (shape_model_and_data if "shape" in spec else embedded_model_and_data)(spec)
    device = spec.get("device", "cpu")
    quantization_config = None
    if quantization == "qlora":
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        )  # fmt: skip
    peft_config = get_peft_config(
        ModelConfig(
            use_peft=quantization != "full", lora_r=16, lora_alpha=32, lora_dropout=0.0,
            lora_target_modules=["all-linear"],
        )
    )  # fmt: skip
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
        learning_rate=2e-5 if quantization == "full" else 5e-4,  # full fine-tuning: the grid's rate
        gradient_checkpointing=spec.get("gradient_checkpointing", False),
        logging_steps=spec["steps"],
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        **data_args,
        **device_args(device),
    )
    return MinorSFTTrainer(
        model_path, args=args, train_dataset=train, peft_config=peft_config, quantization_config=quantization_config
    )


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def measure_memory(spec: dict) -> dict:
    """Peak memory while one mode trains (a fresh process: the peak is its own): resident set size, or on CUDA the
    GPU memory torch allocated."""
    trainer = build_trainer(spec["mode"], spec["quantization"], spec)
    if spec.get("device") == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()  # reset the peak: loading is not training
        trainer.train()
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak: loading is not training
    trainer.train()
    return {"peak_rss_mb": peak_rss_mb()}


def synchronizer(device: str):
    """What waits for the device's queued work before a clock is read: nothing on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def measure_step_times(spec: dict) -> dict:
    """Every mode's optimizer steps, interleaved round by round on the same batches."""
    from minorsft_trl.reference.precompute import ReferencePrecompute

    synchronize = synchronizer(spec.get("device", "cpu"))
    precompute_seconds = {}
    original = ReferencePrecompute.compute_ref_logps

    def timed(self, *args, **kwargs):
        synchronize()
        begin = time.perf_counter()
        values = original(self, *args, **kwargs)  # numpy arrays: the device is done
        precompute_seconds[self.trainer.args.output_dir] = time.perf_counter() - begin
        return values

    ReferencePrecompute.compute_ref_logps = timed  # this process only measures
    modes = spec.get("modes", list(MODES))
    trainers = {mode: build_trainer(mode, spec["quantization"], spec) for mode in modes}
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
    seconds = {mode: [] for mode in modes}
    for _ in range(spec["steps"]):
        for mode, step in steps.items():
            synchronize()
            begin = time.perf_counter()
            step()
            synchronize()
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
        for mode in modes
    }


def build_random_model(spec: dict) -> dict:
    """Save the random model of `spec["config"]` to `spec["model_path"]`, built on the device (bf16 on CUDA, fp32 on
    CPU); its parameter count and the device's name."""
    import torch

    on_cuda = spec["device"] == "cuda"
    num_parameters = save_random_model(
        spec["config"], spec["model_path"], spec["device"], "bfloat16" if on_cuda else "float32"
    )
    device_name = torch.cuda.get_device_name(0) if on_cuda else f"{os.cpu_count()} CPU threads"
    return {"num_parameters": num_parameters, "device_name": device_name}


WORKER_TASKS = {"time": measure_step_times, "memory": measure_memory, "build": build_random_model}


def run_worker(task: str, spec: dict, script: str = __file__, timeout: float | None = None) -> dict:
    """`task` of `script` (this one by default) in a fresh process: its JSON result. Past `timeout` seconds the
    process is killed and `subprocess.TimeoutExpired` raised."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run(
        [sys.executable, script, "--worker", task, json.dumps(spec)], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"{task} {spec} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure_all_modes(spec: dict, cli: argparse.Namespace) -> dict:
    """Step times (one process per quantization, modes interleaved) and peak memory (one process per mode) of every
    mode under every quantization of `cli`, keyed `"<quantization> | <mode>"`."""
    results = {}
    for quantization in cli.quantizations:
        print(f"{quantization}: step times, {cli.rounds} interleaved rounds ...", flush=True)
        quantized = {"quantization": quantization, **spec}
        times = run_worker("time", {**quantized, "steps": cli.rounds, "warmup": cli.warmup})
        for mode in spec.get("modes", MODES):
            print(f"{quantization}: peak memory of {mode} ...", flush=True)
            memory = run_worker("memory", {**quantized, "mode": mode, "steps": cli.memory_steps})
            results[f"{quantization} | {mode}"] = {"quantization": quantization, "mode": mode, **times[mode], **memory}
    return results


def markdown_table(caption: str, results: dict, columns: list) -> str:
    """`caption`, then one row per result; `columns` holds `(title, cell)` pairs, `cell(result, baseline)` the text
    of a result given its sft baseline (the result of the same quantization)."""
    lines = [caption, "", "| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for result in results.values():
        baseline = results[f"{result['quantization']} | sft"]
        lines.append("| " + " | ".join(cell(result, baseline) for _, cell in columns) + " |")
    return "\n".join(lines)


def cost_columns(memory_title: str, memory_key: str, precompute_title: str, precompute_key: str) -> list:
    """The columns of a table: step time and peak memory, each also as a ratio to sft, then the precompute time."""
    return [
        ("quantization", lambda result, _: result["quantization"]),
        ("mode", lambda result, _: result["mode"]),
        ("s/step", lambda result, _: f"{result['step_seconds']:.2f}"),
        ("x sft", lambda result, _: f"{result['ratio_to_sft']:.2f}"),
        (memory_title, lambda result, _: f"{result[memory_key]:.0f}"),
        ("x sft", lambda result, baseline: f"{result[memory_key] / baseline[memory_key]:.2f}"),
        (precompute_title, lambda result, _: f"{result[precompute_key]:.1f}" if result[precompute_key] else ""),
    ]


def run_embedded(cli: argparse.Namespace) -> tuple[dict, str]:
    """The results and table of the embedded SmolLM2-135M-Instruct on si_conversion."""
    with tempfile.TemporaryDirectory() as scratch:
        lengths = {"prompt_length": cli.prompt_length or 0, "completion_length": cli.completion_length}
        modes = {"modes": cli.modes} if cli.modes else {}
        results = measure_all_modes({"batch_size": cli.batch_size, "scratch": scratch, **lengths, **modes}, cli)
    data = "BIG-bench si_conversion"
    if cli.completion_length:
        data = (
            f"random token ids, {cli.prompt_length or 0} prompt + {cli.completion_length} completion tokens per "
            "example (loss on the completion)"
        )
    training = (
        "full fine-tuning (the adapter-disabled modes: a frozen copy)"
        if cli.quantizations == ["full"]
        else "LoRA r=16 on all linear layers"
    )
    caption = (
        f"Embedded SmolLM2-135M-Instruct, {data}, {training}, batch "
        f"{cli.batch_size}, {os.cpu_count()} CPU threads. Step time: median of {cli.rounds - cli.warmup} interleaved "
        "rounds; `x sft`: median over rounds of the step time over the sft step of the same round. Peak RSS during "
        "`train()`, one process per mode."
    )
    columns = cost_columns("peak RSS (MB)", "peak_rss_mb", "one-off precompute (s)", "precompute_seconds")
    return results, markdown_table(caption, results, columns)


def run_shape(cli: argparse.Namespace) -> tuple[dict, str]:
    """The results and table of the random model of `--shape` on synthetic data, on `--device`."""
    config = scaled_shape(cli.shape, cli.width_divisor, cli.num_layers, cli.vocab_divisor)
    description = describe_shape(cli.shape, config)
    print(description, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        spec = {
            "shape": cli.shape,
            "device": cli.device,
            "vocab_size": config["vocab_size"],
            "prompt_length": cli.prompt_length,
            "completion_length": cli.completion_length,
            "batch_size": cli.batch_size,
            "gradient_checkpointing": cli.gradient_checkpointing,
            "scratch": scratch,
            "model_path": os.path.join(scratch, "model"),
            **({"modes": cli.modes} if cli.modes else {}),
        }
        print(f"building the random {cli.shape} model on {cli.device} ...", flush=True)
        model = run_worker("build", {**spec, "config": config})
        results = measure_all_modes(spec, cli)
    for result in results.values():
        result["precompute_seconds_per_1k_examples"] = result["precompute_seconds"] * 1000 / precomputed_examples(cli)
    memory_column = ("peak GPU (MB)", "peak_gpu_mb") if cli.device == "cuda" else ("peak RSS (MB)", "peak_rss_mb")
    columns = cost_columns(*memory_column, "precompute (s / 1k examples)", "precompute_seconds_per_1k_examples")
    return results, markdown_table(shape_caption(cli, description, model), results, columns)


def precomputed_examples(cli: argparse.Namespace) -> int:
    """The examples the precompute of the step-time process runs over: its whole training set."""
    return cli.batch_size * cli.rounds


def shape_caption(cli: argparse.Namespace, description: str, model: dict) -> str:
    """What the `--shape` table measured: the model as `description` and `model` (from `build_random_model`) say,
    the precision, the data and how each column was measured."""
    dtype = "bf16" if cli.device == "cuda" else "fp32"
    weights = {
        "lora": f"`lora`: base weights in {dtype}",
        "qlora": f"`qlora`: base weights quantized to 4-bit NF4 at load (double quantization, {dtype} compute)",
        "full": f"`full`: full fine-tuning in {dtype}, no adapter (the adapter-disabled modes: a frozen copy)",
    }
    memory = (
        "Peak GPU memory: `torch.cuda.max_memory_allocated` during `train()` (reset after loading)"
        if cli.device == "cuda"
        else "Peak RSS during `train()`"
    )
    return (
        f"{description}; {model['num_parameters'] / 1e6:.0f}M parameters, random weights built from the config "
        f"(nothing downloaded). {dtype} training on {model['device_name']}; "
        f"{'; '.join(weights[q] for q in cli.quantizations)}. LoRA r=16 on all linear layers, gradient checkpointing "
        f"{'on' if cli.gradient_checkpointing else 'off'}. Synthetic data: random token ids, {cli.prompt_length} "
        f"prompt + {cli.completion_length} completion tokens per example (loss on the completion), batch "
        f"{cli.batch_size}. Step time: median of {cli.rounds - cli.warmup} interleaved rounds; `x sft`: median over "
        f"rounds of the step time over the sft step of the same round. {memory}, one process per mode. Precompute: "
        f"the one-off reference pass over the {precomputed_examples(cli)} training examples, in seconds per 1000 "
        "examples."
    )


def parse_args() -> argparse.Namespace:
    """The command line, with what it leaves unset taken from `DEFAULTS` (embedded model, or `--shape` on
    `--device`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, help="interleaved optimizer steps per mode (default: 20)")
    parser.add_argument("--warmup", type=int, default=2, help="first rounds left out")
    parser.add_argument("--memory_steps", type=int, default=4, help="steps of each peak-memory run")
    parser.add_argument("--batch_size", type=int, help="(default: 8; --shape: 4)")
    parser.add_argument(
        "--quantizations",
        nargs="+",
        choices=["lora", "qlora", "full"],
        help="(default: lora qlora; --shape: lora cpu, qlora cuda); full: full fine-tuning",
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="the modes measured (default: all)")
    parser.add_argument(
        "--output",
        help="(default: benchmarks/results/reference_cost.json; with lengths: ...reference_cost_length<n>.json; "
        "--shape: ...reference_cost_<shape>_<device>.json)",
    )
    shape = parser.add_argument_group("a real architecture with random weights, on synthetic data")
    shape.add_argument("--shape", choices=sorted(SHAPES), help="the architecture")
    shape.add_argument("--device", choices=["cpu", "cuda"], help="(default: cuda if there is one, else cpu)")
    shape.add_argument("--width_divisor", type=int, help="divides the widths and head counts (default: 4 cpu, 1 cuda)")
    shape.add_argument("--num_layers", type=int, help="layers kept (default: 4 cpu, all cuda)")
    shape.add_argument("--vocab_divisor", type=int, help="divides the vocabulary (default: 32 cpu, 1 cuda)")
    shape.add_argument("--prompt_length", type=int, help="prompt tokens per example (default: 128 cpu, 256 cuda)")
    shape.add_argument(
        "--completion_length", type=int, help="completion tokens per example (default: 128 cpu, 256 cuda)"
    )
    shape.add_argument("--gradient_checkpointing", action="store_true", default=None, help="(default: off)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        return cli
    if cli.shape is None:
        if given := [f"--{name}" for name in SHAPE_OPTIONS if getattr(cli, name) is not None]:
            parser.error(f"{', '.join(given)} only apply with --shape")
        defaults = DEFAULTS["embedded"]
    else:
        if cli.device is None:
            import torch

            cli.device = "cuda" if torch.cuda.is_available() else "cpu"
        defaults = DEFAULTS[cli.device]
    for name, value in defaults.items():
        if getattr(cli, name) is None:
            setattr(cli, name, value)
    if cli.shape is not None:
        try:
            scaled_shape(cli.shape, cli.width_divisor, cli.num_layers, cli.vocab_divisor)
        except ValueError as error:
            parser.error(str(error))
    if cli.modes is not None and "sft" not in cli.modes:
        cli.modes = ["sft", *cli.modes]  # every ratio is to it
    if cli.output is None:
        name = f"reference_cost_{cli.shape}_{cli.device}" if cli.shape else "reference_cost"
        if not cli.shape and cli.completion_length:
            name += f"_length{(cli.prompt_length or 0) + cli.completion_length}"
        cli.output = f"benchmarks/results/{name}.json"
    return cli


def save_results(results: dict, table: str, output: str) -> None:
    """`output` (JSON, every measurement) and the table beside it (`.md`)."""
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.splitext(output)[0] + ".md", "w") as file:
        file.write(table + "\n")


def main() -> None:
    cli = parse_args()
    if cli.worker:
        task, spec = cli.worker[0], json.loads(cli.worker[1])
        print(json.dumps(WORKER_TASKS[task](spec)))
        return
    results, table = run_shape(cli) if cli.shape else run_embedded(cli)
    print("\n" + table)
    save_results(results, table, cli.output)


if __name__ == "__main__":
    main()
