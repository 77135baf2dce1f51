"""Does Minor SFT do what the paper says? Plain SFT, "SFT using DPO" and Minor SFT over a small grid, on the same
train split, evaluated on the same held-out split and on general data none of them was trained on.

    python benchmarks/compare_methods.py       # our answer: SmolLM2-135M-Instruct on si_conversion, ~40 min, 2 CPUs
    python benchmarks/compare_methods.py --task bigbench:hyperbaton --grid "sft:lr=1e-4" "minor_sft:lr=2e-4:beta=0.1"

Every run has the same seed and data order, LoRA on the same base model. Measured per run: accuracy on the held-out
split of `--task` (multiple choice scored by log-likelihood, or exact match for generation tasks); drift on data it
was not trained on: accuracy on `--general_tasks` and the per-token NLL of held-out natural text (`--nll_task`)
relative to the base model; the `deviation` curve during training. The base model's evaluation and every run are
cached (keyed by the base weights, the data and the settings), so extending the grid trains only the new runs.

Outputs in `--output_dir`: `results.md` (the table), `results.json`, `deviation_curves.png` (the paper's Figure 1)
and `accuracy_vs_drift.png` (one point per run).
"""

import argparse
import gc
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer, bigbench
from minorsft_trl.cache import cache_root, cached_directory, file_sha256
from minorsft_trl.embedded import resolve_model
from minorsft_trl.evaluation import Accuracy, mean_token_nll, task_accuracy

EVAL_FORMAT = 1  # bump when the evaluation below changes its numbers


@dataclass(frozen=True)
class Run:
    method: str  # MinorSFTConfig.loss_type: "nll" is plain SFT
    learning_rate: float
    beta: float | None

    @property
    def name(self) -> str:
        beta = f", β={self.beta:g}" if self.beta is not None else ""
        return f"{METHOD_NAMES[self.method]} (lr={self.learning_rate:g}{beta})"


METHOD_NAMES = {"nll": "SFT", "sft_dpo": "SFT using DPO", "minor_sft": "Minor SFT"}
METHOD_COLOURS = {"nll": "tab:grey", "sft_dpo": "tab:orange", "minor_sft": "tab:blue"}
MARKERS = ["o", "s", "^", "D", "v", "P"]


def parse_grid(specs: list[str]) -> list[Run]:
    """`"minor_sft:lr=5e-4,1e-3:beta=0.04,0.2"` -> one run per (lr, beta); `sft` means loss_type `nll`."""
    runs = []
    for spec in specs:
        method, *fields = spec.split(":")
        method = {"sft": "nll"}.get(method, method)
        if method not in METHOD_NAMES:
            raise ValueError(f"Unknown method {method!r} in --grid {spec!r}: use sft, sft_dpo or minor_sft.")
        values = {key: [float(v) for v in vals.split(",")] for key, vals in (f.split("=") for f in fields)}
        if set(values) - {"lr", "beta"} or "lr" not in values:
            raise ValueError(f"--grid {spec!r}: give lr=... and, for sft_dpo and minor_sft, beta=...")
        betas = [None] if method == "nll" else values.get("beta", [0.04])
        runs += [Run(method, lr, beta) for lr in values["lr"] for beta in betas]
    return runs


def task_name(name: str) -> str:
    if not name.startswith(bigbench.SCHEME):
        raise ValueError(f"Tasks are BIG-bench tasks named `bigbench:<task>`, got {name!r}.")
    return name.removeprefix(bigbench.SCHEME)


def load_data(cli) -> dict:
    """The train split, the held-out split, the general tasks and the held-out texts, all fixed by `--seed`."""
    splits = bigbench.load_splits(task_name(cli.task), test_size=cli.test_size, seed=cli.seed)
    general = {}
    for name in cli.general_tasks:
        examples = bigbench.task_examples(task_name(name))
        random.Random(cli.seed).shuffle(examples)
        general[name] = Dataset.from_list(examples[: cli.general_size])
    texts = bigbench.task_texts(task_name(cli.nll_task))
    random.Random(cli.seed).shuffle(texts)
    return {
        "train": splits["train"].select(range(min(cli.train_size, len(splits["train"])))),
        "test": splits["test"],
        "general": general,
        "texts": texts[: cli.nll_texts],
    }


def evaluate(model, tokenizer, data, cli) -> dict:
    in_domain = task_accuracy(model, tokenizer, data["test"], desc="In-domain accuracy")
    general = {name: task_accuracy(model, tokenizer, d, desc=name) for name, d in data["general"].items()}
    pooled = Accuracy(sum(a.correct for a in general.values()), sum(a.total for a in general.values()))
    return {
        "in_domain": asdict(in_domain),
        "general": asdict(pooled),
        "general_per_task": {name: asdict(a) for name, a in general.items()},
        "nll": mean_token_nll(model, tokenizer, data["texts"], max_tokens=cli.nll_max_tokens),
    }


def cached_result(name: str, key: dict, compute) -> dict:
    """`compute()`'s JSON result, cached under `name` and `key` (rerunning a grid trains only its new runs)."""
    entry_name = f"{name}-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def build(out: Path) -> None:
        (out / "evaluation.json").write_text(json.dumps(compute()))

    entry = cached_directory(cache_root() / "evals" / entry_name, key, build)
    return json.loads((entry / "evaluation.json").read_text())


def evaluation_key(model_path: str, cli) -> dict:
    """Everything that changes an evaluation: the base weights (by content), the data and the evaluation settings."""
    weights = sorted(Path(model_path).glob("*.safetensors"))
    settings = (
        "task",
        "general_tasks",
        "nll_task",
        "test_size",
        "general_size",
        "seed",
        "nll_texts",
        "nll_max_tokens",
    )
    return {
        "format": EVAL_FORMAT,
        "weights": [file_sha256(path) for path in weights] or model_path,
        **{k: getattr(cli, k) for k in settings},
    }


def base_evaluation(model_path: str, tokenizer, data, cli) -> dict:
    def compute() -> dict:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        return evaluate(model, tokenizer, data, cli)

    return cached_result("base", evaluation_key(model_path, cli), compute)


def run_result(run: Run, model_path: str, tokenizer, data, cli) -> dict:
    """One run of the grid, trained and evaluated, or read from the cache if it was already."""
    training = ("train_size", "batch_size", "max_length", "lora_r")
    key = {**evaluation_key(model_path, cli), "run": asdict(run), **{k: getattr(cli, k) for k in training}}
    slug = f"{run.method}-lr{run.learning_rate:g}-beta{run.beta}"
    return cached_result(slug, key, lambda: train_and_evaluate(run, model_path, tokenizer, data, cli))


def train_and_evaluate(run: Run, model_path: str, tokenizer, data, cli) -> dict:
    started = time.perf_counter()
    args = MinorSFTConfig(
        output_dir=str(Path(cli.output_dir) / "runs" / f"{run.method}-lr{run.learning_rate:g}-beta{run.beta}"),
        loss_type=run.method,
        beta=run.beta if run.beta is not None else 0.04,
        log_deviation=True,  # plain SFT logs the deviation too, on the same scale
        precompute_ref_log_probs=True,  # one reference pass over the data, shared by every run of the grid
        learning_rate=run.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        num_train_epochs=1,
        per_device_train_batch_size=cli.batch_size,
        max_length=cli.max_length,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        seed=cli.seed,
        disable_tqdm=True,
    )
    trainer = MinorSFTTrainer(
        model_path,
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        peft_config=LoraConfig(r=cli.lora_r, lora_alpha=2 * cli.lora_r, lora_dropout=0.0, target_modules="all-linear"),
    )
    trainer.train()
    curve = [
        {"step": log["step"], "deviation": log["deviation"], "loss": log["loss"]}
        for log in trainer.state.log_history
        if "deviation" in log and "loss" in log
    ]
    model = trainer.model.merge_and_unload()  # plain weights: faster to evaluate, same function
    result = {"run": asdict(run), "name": run.name, **evaluate(model, tokenizer, data, cli), "curve": curve}
    result["final_deviation"] = curve[-1]["deviation"]
    result["wall_seconds"] = time.perf_counter() - started
    del trainer, model
    gc.collect()
    return result


def percent(accuracy: dict) -> str:
    accuracy = Accuracy(**accuracy)
    return f"{100 * accuracy.value:.1f} ± {100 * accuracy.stderr:.1f}"


def table(base: dict, results: list[dict], cli) -> str:
    general = ", ".join(f"`{name.removeprefix(bigbench.SCHEME)}`" for name in cli.general_tasks)
    lines = [
        f"Model `{cli.model}`, trained on {cli.train_size} examples of `{task_name(cli.task)}`, LoRA r={cli.lora_r}, "
        f"batch {cli.batch_size}, 1 epoch, seed {cli.seed}. In-domain: {cli.test_size} held-out questions. General: "
        f"{cli.general_size} questions each of {general}. NLL change: mean per-token NLL of {cli.nll_texts} held-out "
        f"`{task_name(cli.nll_task)}` texts minus the base model's (lower is less drift). Accuracies in % ± one "
        "standard error.",
        "",
        "| method | lr | β | in-domain acc | general acc | NLL change | final deviation | wall time |",
        "|---|---|---|---|---|---|---|---|",
        f"| base model | | | {percent(base['in_domain'])} | {percent(base['general'])} | 0 | 0 | |",
    ]
    for result in results:
        run = result["run"]
        beta = "" if run["beta"] is None else f"{run['beta']:g}"
        lines.append(
            f"| {METHOD_NAMES[run['method']]} | {run['learning_rate']:g} | {beta} | {percent(result['in_domain'])} | "
            f"{percent(result['general'])} | {result['nll'] - base['nll']:+.3f} | {result['final_deviation']:.3f} | "
            f"{result['wall_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


def plot(base: dict, results: list[dict], output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for result in results:
        run, curve = result["run"], result["curve"]
        same_method = [r for r in results if r["run"]["method"] == run["method"]]
        axis.plot(
            [point["step"] for point in curve],
            [point["deviation"] for point in curve],
            color=METHOD_COLOURS[run["method"]],
            linestyle=styles[same_method.index(result) % len(styles)],
            label=result["name"],
        )
    axis.set(xlabel="step", ylabel="deviation m_theta (log-ratio per answer token)", title="Deviation during training")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output_dir / "deviation_curves.png", dpi=110)
    plt.close(figure)

    def accuracy(entry, key):
        return 100 * Accuracy(**entry[key]).value

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    drifts = [
        ("NLL change on held-out text (nats/token)", lambda r: r["nll"] - base["nll"]),
        ("general accuracy change (points)", lambda r: accuracy(r, "general") - accuracy(base, "general")),
    ]
    for axis, (label, drift) in zip(axes, drifts, strict=True):
        for method in METHOD_NAMES:
            points = [r for r in results if r["run"]["method"] == method]
            if not points:
                continue
            for index, r in enumerate(points):
                axis.scatter(
                    [drift(r)],
                    [accuracy(r, "in_domain")],
                    color=METHOD_COLOURS[method],
                    marker=MARKERS[index % len(MARKERS)],
                    s=70,
                    label=r["name"],
                )
        axis.set(xlabel=label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"in-domain accuracy (%); base model {accuracy(base, 'in_domain'):.1f}")
    axes[0].set_title("better: up; less drift: left (closer to 0)")
    axes[1].set_title("better: up; general ability kept: right")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output_dir / "accuracy_vs_drift.png", dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct")
    parser.add_argument("--task", default="bigbench:unit_conversion/si_conversion")
    parser.add_argument("--general_tasks", nargs="+", default=["bigbench:hyperbaton", "bigbench:social_iqa"])
    parser.add_argument("--nll_task", default="bigbench:gem/xsum", help="its `input` texts are the held-out text")
    parser.add_argument("--train_size", type=int, default=400)
    parser.add_argument("--test_size", type=int, default=200)
    parser.add_argument("--general_size", type=int, default=150, help="questions per general task")
    parser.add_argument("--nll_texts", type=int, default=40)
    parser.add_argument("--nll_max_tokens", type=int, default=256)
    parser.add_argument(
        "--grid",
        nargs="+",
        default=["sft:lr=2.5e-4,5e-4,1e-3", "sft_dpo:lr=5e-4,1e-3:beta=0.04", "minor_sft:lr=5e-4,1e-3:beta=0.04,0.2"],
        help="method:lr=a,b[:beta=c,d] per method; sft means plain SFT",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default="benchmarks/results/compare_methods")
    cli = parser.parse_args()

    runs = parse_grid(cli.grid)
    output_dir = Path(cli.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cli.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_data(cli)
    base = base_evaluation(model_path, tokenizer, data, cli)
    print(f"Base model: in-domain {percent(base['in_domain'])}, general {percent(base['general'])}", flush=True)

    results = []
    for index, run in enumerate(runs, start=1):
        print(f"[{index}/{len(runs)}] {run.name}", flush=True)
        results.append(run_result(run, model_path, tokenizer, data, cli))
        (output_dir / "results.json").write_text(json.dumps({"config": vars(cli), "base": base, "runs": results}))
        (output_dir / "results.md").write_text(table(base, results, cli))
        plot(base, results, output_dir)
    print(table(base, results, cli))


if __name__ == "__main__":
    main()
