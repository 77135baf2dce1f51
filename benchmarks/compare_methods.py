"""Which loss drifts least for what it learns? Plain SFT, Minor SFT and the reference-regularised family, over seeds,
learning rates, two task kinds and both LoRA and full fine-tuning, with intervals.

    python benchmarks/compare_methods.py --quick   # a first look: 1 task, 4 methods + control, 2 seeds, 10 min
    python benchmarks/compare_methods.py           # the default grid, 57 runs, 103 min on 2 CPU cores

A grid is a list of blocks; a block is one task and one kind of fine-tuning, with methods x learning rates x seeds
(`GRIDS`). Every run starts from the embedded SmolLM2-135M-Instruct, trains 1 epoch on the same training questions
(the seed sets the adapter's initialisation and the data order), and is measured on the same held-out questions and
texts:

- accuracy on the held-out questions of the task (multiple choice by log-likelihood, or exact match of a greedy
  generation);
- drift, in three measures that do not saturate once the training answers are learnt: the paper's m_theta on the
  held-out answers (log-ratio per answer token against the base model); the change of the per-token NLL of held-out
  natural text (BIG-bench `gem/xsum` inputs); the forward `KL(pi_base || pi_theta)` per token on text the base model
  samples for held-out prompts ("RL's Razor", arXiv 2509.04259); m_theta on the training batches is logged too
  (`train deviation`), for comparison with the paper's Figure 1.

Every measure is a mean over seeds with its 95% t interval; differences between methods are paired by seed (same
seed, same questions, same texts). A block with several learning rates also reports each method's drift at matched
accuracy (interpolated between its learning rates, seed by seed, never extrapolated), and its Pareto front. The step-
size control trains plain SFT at Minor SFT's learning rate times the mean `minor_weight` of Minor SFT's runs, to
separate the brake's re-weighting from its average scaling of the step.

Every run is cached as it finishes (keyed by the base weights, the data, the settings and the seed): an interrupted
grid resumes where it stopped, and a grid can be run in pieces (`--blocks 0 2`). Outputs in `--output_dir`:
`results.md`, `results.json` (every run and every aggregate) and `accuracy_vs_drift_<block>.png`.
"""

import argparse
import functools
import gc
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from comparison_metrics import base_generations, forward_kl_on_base_text, heldout_answer_logps, heldout_deviation
from comparison_stats import Interval, interpolate_at, paired_difference, pareto_front, t_interval
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer, bigbench
from minorsft_trl.cache import cache_root, cached_directory, file_sha256
from minorsft_trl.embedded import resolve_model
from minorsft_trl.evaluation import mean_token_nll, task_accuracy
from minorsft_trl.loss_types import REFERENCE_LOSSES

EVAL_FORMAT = 2  # bump when the evaluation below changes its numbers


@dataclass(frozen=True)
class Method:
    label: str
    loss_type: str
    settings: dict = field(default_factory=dict)


METHODS = {
    "sft": Method("SFT", "nll"),
    "minor_sft": Method("Minor SFT", "minor_sft", {"beta": 0.04}),
    "sft_dpo": Method("SFT using DPO", "sft_dpo", {"beta": 0.04}),
    "asft": Method("ASFT", "asft", {"kl_coef": 0.05}),
    "sft_kl": Method("SFT + KL", "sft_kl", {"kl_coef": 0.05}),
    "iw_sft": Method("iw-SFT", "iw_sft", {"iw_weight_max": 16.0}),
    "step_control": Method("SFT at Minor SFT's mean step", "nll"),
}
COLOURS = {
    "sft": "tab:grey",
    "minor_sft": "tab:blue",
    "sft_dpo": "tab:orange",
    "asft": "tab:green",
    "sft_kl": "tab:olive",
    "iw_sft": "tab:red",
    "step_control": "black",
}
MEASURES = {  # key: (title, higher is better)
    "accuracy": ("held-out accuracy (%)", True),
    "heldout_deviation": ("held-out m_theta", False),
    "nll_change": ("NLL change on held-out text", False),
    "forward_kl": ("KL(base ‖ θ) on base text", False),
    "train_deviation": ("train deviation", False),
}
DRIFTS = ("heldout_deviation", "nll_change", "forward_kl")
FINETUNING = {"lora": "LoRA r=16 on all linear layers", "full": "full fine-tuning"}

SI_CONVERSION = "bigbench:unit_conversion/si_conversion"
# Exact-match generation of another kind: the model must write the answer (a count, "four" or "4"), not pick a
# choice; the base model scores 0% on its prompts (it does not answer in the form), so the task measures learning
COUNTING = "bigbench:object_counting"


@dataclass(frozen=True)
class Block:
    task: str
    finetuning: str  # "lora" or "full"
    methods: tuple[str, ...]
    learning_rates: tuple[float, ...]
    step_control_lr: float | None = None  # the Minor SFT learning rate whose mean step the control takes

    @property
    def name(self) -> str:
        return f"{self.task.removeprefix(bigbench.SCHEME).replace('/', '-')}-{self.finetuning}"


@dataclass(frozen=True)
class Grid:
    blocks: tuple[Block, ...]
    seeds: tuple[int, ...]
    train_size: int
    test_size: int
    nll_texts: int
    kl_prompts: int


GRIDS = {
    # 57 runs, 103 min on 2 CPU cores (1.8 min a run). Cut to fit 2.5 hours: 2 learning rates per method (the
    # matched-accuracy interpolation needs two), 200 training questions, full fine-tuning for SFT and Minor SFT at
    # one learning rate, the second task for SFT and Minor SFT only, the step-size control at one learning rate.
    "default": Grid(
        blocks=(
            Block(
                SI_CONVERSION,
                "lora",
                ("sft", "minor_sft", "sft_dpo", "asft", "sft_kl", "iw_sft"),
                (2.5e-4, 1e-3),
                1e-3,
            ),
            Block(SI_CONVERSION, "full", ("sft", "minor_sft"), (2e-5,)),
            Block(COUNTING, "lora", ("sft", "minor_sft"), (2.5e-4, 1e-3)),
        ),
        seeds=(0, 1, 2),
        train_size=200,
        test_size=200,
        nll_texts=32,
        kl_prompts=32,
    ),
    "quick": Grid(
        blocks=(Block(SI_CONVERSION, "lora", ("sft", "minor_sft", "asft", "iw_sft"), (1e-3,), 1e-3),),
        seeds=(0, 1),
        train_size=96,
        test_size=100,
        nll_texts=16,
        kl_prompts=16,
    ),
}


@dataclass(frozen=True)
class Run:
    block: int
    method: str
    learning_rate: float
    seed: int


# ------------------------------------------------------------------ data and base model


def load_task(task: str, grid: Grid, data_seed: int) -> dict:
    """The training and held-out questions of `task`, the same for every run (fixed by `data_seed`)."""
    splits = bigbench.load_splits(task.removeprefix(bigbench.SCHEME), test_size=grid.test_size, seed=data_seed)
    train = splits["train"]
    return {"train": train.select(range(min(grid.train_size, len(train)))), "test": splits["test"]}


def held_out_texts(grid: Grid, data_seed: int) -> list[str]:
    texts = bigbench.task_texts("gem/xsum")
    random.Random(data_seed).shuffle(texts)
    return texts[: grid.nll_texts]


def cached_result(name: str, key: dict, compute) -> dict:
    """`compute()`'s JSON result, cached under `name` and `key`: a grid resumes where it stopped."""
    entry_name = f"{name}-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def build(out: Path) -> None:
        (out / "result.json").write_text(json.dumps(compute()))

    entry = cached_directory(cache_root() / "comparison" / entry_name, key, build)
    return json.loads((entry / "result.json").read_text())


def answers(test) -> list[str]:
    """The correct answer of every held-out question, as trained: the `completion` column."""
    return list(test["completion"])


def base_evaluation(model_path: str, tokenizer, task: dict, texts: list[str], grid: Grid, key: dict) -> dict:
    """The base model's accuracy, held-out answer log-probs, text NLL, and its samples for the forward KL."""

    def compute() -> dict:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        sums, lengths = heldout_answer_logps(model, tokenizer, list(task["test"]["prompt"]), answers(task["test"]))
        prompts = list(task["test"]["prompt"])[: grid.kl_prompts]
        return {
            "accuracy": task_accuracy(model, tokenizer, task["test"]).value,
            "answer_logps": sums,
            "answer_lengths": lengths,
            "nll": mean_token_nll(model, tokenizer, texts),
            "samples": base_generations(model, tokenizer, prompts, max_new_tokens=48, seed=0),
        }

    return cached_result("base", key, compute)


# ------------------------------------------------------------------ one run


def train_and_evaluate(run: Run, block: Block, learning_rate: float, model_path, tokenizer, task, texts, base) -> dict:
    started = time.perf_counter()
    method = METHODS[run.method]
    loss = REFERENCE_LOSSES.get(method.loss_type)
    args = MinorSFTConfig(
        output_dir=str(Path("outputs") / "comparison" / f"{block.name}-{run.method}-lr{learning_rate:g}-s{run.seed}"),
        loss_type=method.loss_type,
        **method.settings,
        log_deviation=loss is None,  # plain SFT logs its train deviation too, on the same scale
        # One reference pass over the data, shared by every run that needs per-example log-probs only
        precompute_ref_log_probs=loss is None or loss.reference.can_be_precomputed,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        num_train_epochs=1,
        per_device_train_batch_size=8,
        max_length=256,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=run.seed,
        data_seed=run.seed,
        disable_tqdm=True,
    )
    peft_config = None
    if block.finetuning == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = MinorSFTTrainer(
        model_path, args=args, train_dataset=task["train"], processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "deviation" in log and "loss" in log]
    weights = [log["minor_weight"] for log in logs if "minor_weight" in log]
    model = trainer.model.merge_and_unload() if block.finetuning == "lora" else trainer.model
    model.eval()
    test = task["test"]
    sums, lengths = heldout_answer_logps(model, tokenizer, list(test["prompt"]), answers(test))
    base_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    result = {
        "accuracy": task_accuracy(model, tokenizer, test).value,
        "heldout_deviation": heldout_deviation(sums, base["answer_logps"], lengths),
        "nll_change": mean_token_nll(model, tokenizer, texts) - base["nll"],
        "forward_kl": forward_kl_on_base_text(model, base_model, base["samples"], tokenizer.pad_token_id),
        "train_deviation": logs[-1]["deviation"],
        "mean_minor_weight": sum(weights) / len(weights) if weights else None,
        "learning_rate": learning_rate,
        "curve": [{"step": log["step"], "deviation": log["deviation"], "loss": log["loss"]} for log in logs],
        "wall_seconds": time.perf_counter() - started,
    }
    del trainer, model, base_model
    gc.collect()
    return result


# ------------------------------------------------------------------ the grid


def run_grid(grid: Grid, block_indices: list[int], model_path: str) -> dict:
    """Every run of the chosen blocks (cached ones read back), in an order where Minor SFT precedes its control."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    weights_key = [file_sha256(path) for path in sorted(Path(model_path).glob("*.safetensors"))]
    data_seed = 42
    texts = held_out_texts(grid, data_seed)
    results = {"base": {}, "runs": []}
    for index in block_indices:
        block = grid.blocks[index]
        task = load_task(block.task, grid, data_seed)
        key = {
            "format": EVAL_FORMAT,
            "weights": weights_key,
            "task": block.task,
            "data_seed": data_seed,
            **{k: getattr(grid, k) for k in ("train_size", "test_size", "nll_texts", "kl_prompts")},
        }
        base = base_evaluation(model_path, tokenizer, task, texts, grid, key)
        results["base"][block.name] = {k: base[k] for k in ("accuracy", "nll")}
        print(f"{block.name}: base model accuracy {100 * base['accuracy']:.1f}%", flush=True)
        planned = [Run(index, m, lr, s) for m in block.methods for lr in block.learning_rates for s in grid.seeds]
        if block.step_control_lr is not None:
            planned += [Run(index, "step_control", block.step_control_lr, s) for s in grid.seeds]
        for number, run in enumerate(planned, start=1):
            learning_rate = run.learning_rate
            if run.method == "step_control":
                minor = [
                    r["mean_minor_weight"]
                    for r in results["runs"]
                    if r["block"] == index and r["method"] == "minor_sft" and r["learning_rate"] == learning_rate
                ]
                learning_rate = learning_rate * sum(minor) / len(minor)
            print(
                f"[{block.name} {number}/{len(planned)}] {run.method} lr={learning_rate:.3g} seed={run.seed}",
                flush=True,
            )
            run_key = {
                **key,
                "finetuning": block.finetuning,
                "method": asdict(METHODS[run.method]),
                "lr": learning_rate,
                "seed": run.seed,
            }
            result = cached_result(
                f"{block.name}-{run.method}",
                run_key,
                functools.partial(
                    train_and_evaluate, run, block, learning_rate, model_path, tokenizer, task, texts, base
                ),
            )
            results["runs"].append(
                {**asdict(run), **result, "learning_rate": run.learning_rate, "trained_lr": learning_rate}
            )
    return results


# ------------------------------------------------------------------ aggregates


def per_seed(runs: list[dict], measure: str) -> dict[int, float]:
    return {r["seed"]: r[measure] * (100 if measure == "accuracy" else 1) for r in runs}


def configurations(results: dict, index: int) -> dict[tuple[str, float], list[dict]]:
    """The runs of block `index`, grouped by (method, nominal learning rate)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in results["runs"]:
        if run["block"] == index:
            groups.setdefault((run["method"], run["learning_rate"]), []).append(run)
    return groups


def summarise_block(results: dict, grid: Grid, index: int) -> dict:
    """Every measure of every configuration with its interval; paired differences against SFT at the same learning
    rate; drift at matched accuracy; the Pareto front; the step-size control against Minor SFT."""
    block = grid.blocks[index]
    groups = configurations(results, index)
    summary = {"configurations": [], "paired": [], "matched": [], "control": None}
    for (method, lr), runs in groups.items():
        entry = {"method": method, "learning_rate": lr, "trained_lr": runs[0]["trained_lr"]}
        entry.update({m: t_interval(list(per_seed(runs, m).values())).to_dict() for m in MEASURES})
        if method == "minor_sft":
            entry["mean_minor_weight"] = t_interval([r["mean_minor_weight"] for r in runs]).to_dict()
        summary["configurations"].append(entry)
        baseline = groups.get(("sft", lr))
        if method not in ("sft", "step_control") and baseline:  # the control has its own comparison, below
            summary["paired"].append(
                {
                    "method": method,
                    "learning_rate": lr,
                    **{m: paired_difference(per_seed(runs, m), per_seed(baseline, m)).to_dict() for m in MEASURES},
                }
            )
    points = [(c["accuracy"]["mean"], c["forward_kl"]["mean"]) for c in summary["configurations"]]
    summary["pareto_front"] = [
        (summary["configurations"][i]["method"], summary["configurations"][i]["trained_lr"])
        for i in pareto_front(points)
    ]
    if len(block.learning_rates) > 1:
        summary["matched"] = matched_accuracy(groups, block)
    if block.step_control_lr is not None and ("step_control", block.step_control_lr) in groups:
        control, minor = groups[("step_control", block.step_control_lr)], groups[("minor_sft", block.step_control_lr)]
        summary["control"] = {
            "learning_rate": control[0]["trained_lr"],
            **{m: paired_difference(per_seed(minor, m), per_seed(control, m)).to_dict() for m in MEASURES},
        }
    return summary


def matched_accuracy(groups: dict, block: Block) -> list[dict]:
    """Each method's drift at one accuracy every method reached: the middle of the overlap of their (seed-mean)
    accuracy ranges over learning rates, interpolated seed by seed between the method's learning rates. A seed whose
    learning rates do not bracket that accuracy has no value there: each row counts the seeds it rests on
    (`seeds_reaching`, out of `seeds`)."""
    methods = [m for m in block.methods if all((m, lr) in groups for lr in block.learning_rates)]
    ranges = {}
    for method in methods:
        means = [
            t_interval(list(per_seed(groups[(method, lr)], "accuracy").values())).mean for lr in block.learning_rates
        ]
        ranges[method] = (min(means), max(means))
    low, high = max(r[0] for r in ranges.values()), min(r[1] for r in ranges.values())
    if low > high:
        return [{"target_accuracy": None, "note": "the methods' accuracy ranges do not overlap"}]
    target = (low + high) / 2
    rows = []
    for method in methods:
        seeds = sorted({r["seed"] for lr in block.learning_rates for r in groups[(method, lr)]})
        row = {"method": method, "target_accuracy": target, "seeds": len(seeds)}
        for drift in DRIFTS:
            values = []
            for seed in seeds:
                seed_points = [
                    (r["accuracy"] * 100, r[drift])
                    for lr in block.learning_rates
                    for r in groups[(method, lr)]
                    if r["seed"] == seed
                ]
                values.append(interpolate_at(seed_points, target))
            row[drift] = t_interval(values).to_dict()
        row["seeds_reaching"] = row[DRIFTS[0]]["n"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ report


def interval_text(interval: dict, digits: int = 3) -> str:
    return Interval(**interval).format(digits=digits)


def measures_table(rows: list[tuple[str, float, dict]]) -> list[str]:
    """A markdown table, one row per `(label, learning rate, intervals by measure)`, a column per measure."""
    lines = ["| method | lr | " + " | ".join(title for title, _ in MEASURES.values()) + " |"]
    lines.append("|---|---|" + "---|" * len(MEASURES))
    for label, learning_rate, intervals in rows:
        cells = [interval_text(intervals[m], 1 if m == "accuracy" else 3) for m in MEASURES]
        lines.append(f"| {label} | {learning_rate:.3g} | " + " | ".join(cells) + " |")
    return lines


def matched_table(rows: list[dict]) -> list[str]:
    """The drift at matched accuracy, a row per method, with the seeds each interval rests on."""
    lines = [
        "| method | seeds reaching it | " + " | ".join(MEASURES[d][0] for d in DRIFTS) + " |",
        "|---|---|" + "---|" * len(DRIFTS),
    ]
    for row in rows:
        cells = [f"{row['seeds_reaching']} of {row['seeds']}"] + [interval_text(row[d]) for d in DRIFTS]
        lines.append(f"| {METHODS[row['method']].label} | " + " | ".join(cells) + " |")
    return lines


def method_label(method: str, trained_lr: float) -> str:
    label = METHODS[method].label
    return f"{label} (lr {trained_lr:.3g})" if method == "step_control" else label


def report(results: dict, grid: Grid, summaries: dict[int, dict], wall_seconds: float) -> str:
    lines = [
        f"Embedded SmolLM2-135M-Instruct; seeds {list(grid.seeds)}; {grid.train_size} training questions, 1 epoch, "
        f"batch 8; {grid.test_size} held-out questions; drift on {grid.nll_texts} held-out `gem/xsum` texts (NLL "
        f"change, nats/token) and on base-model samples for {grid.kl_prompts} held-out prompts (forward KL, "
        "nats/token). Every cell: mean over seeds [95% t interval]. Accuracy in %. Wall time of the runs: "
        f"{wall_seconds / 60:.0f} min.",
        "",
    ]
    for index, summary in summaries.items():
        block = grid.blocks[index]
        base = results["base"][block.name]
        lines += [
            f"## {block.task.removeprefix(bigbench.SCHEME)}, {FINETUNING[block.finetuning]}",
            "",
            f"Base model: accuracy {100 * base['accuracy']:.1f}%.",
            "",
        ]
        lines += measures_table(
            [(method_label(c["method"], c["trained_lr"]), c["trained_lr"], c) for c in summary["configurations"]]
        )
        if summary["paired"]:
            lines += ["", "Paired differences against SFT at the same learning rate (method - SFT; same seeds):", ""]
            lines += measures_table([(METHODS[p["method"]].label, p["learning_rate"], p) for p in summary["paired"]])
        if summary["matched"]:
            target = summary["matched"][0]["target_accuracy"]
            if target is None:
                lines += ["", "Matched accuracy: " + summary["matched"][0]["note"] + "."]
            else:
                lines += [
                    "",
                    f"Drift at matched held-out accuracy {target:.1f}% (interpolated seed by seed between learning "
                    "rates; a seed whose learning rates do not bracket it is left out, and counted):",
                    "",
                ]
                lines += matched_table(summary["matched"])
        if summary["control"]:
            control = summary["control"]
            lines += [
                "",
                f"Step-size control: Minor SFT minus plain SFT at Minor SFT's learning rate times its mean weight "
                f"(lr {control['learning_rate']:.3g}; same seeds):",
                "",
                "| " + " | ".join(MEASURES[m][0] for m in MEASURES) + " |",
                "|" + "---|" * len(MEASURES),
                "| " + " | ".join(interval_text(control[m], 1 if m == "accuracy" else 3) for m in MEASURES) + " |",
            ]
        front = ", ".join(f"{METHODS[m].label} lr {lr:.3g}" for m, lr in summary["pareto_front"])
        lines += ["", f"Pareto front (accuracy up, forward KL down): {front}.", ""]
    return "\n".join(lines)


def plot_block(summary: dict, block: Block, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(DRIFTS), figsize=(5 * len(DRIFTS), 4.2), sharey=True)
    for axis, drift in zip(axes, DRIFTS, strict=True):
        for method in dict.fromkeys(c["method"] for c in summary["configurations"]):
            points = sorted(
                (c for c in summary["configurations"] if c["method"] == method), key=lambda c: c["learning_rate"]
            )
            xs, ys = [c[drift]["mean"] for c in points], [c["accuracy"]["mean"] for c in points]

            def errors(key, cs=points):
                return [
                    [max(c[key]["mean"] - c[key]["low"], 0) if c[key]["n"] > 1 else 0 for c in cs],
                    [max(c[key]["high"] - c[key]["mean"], 0) if c[key]["n"] > 1 else 0 for c in cs],
                ]

            axis.errorbar(
                xs, ys, xerr=errors(drift), yerr=errors("accuracy"), marker="o", capsize=3,
                color=COLOURS[method], label=METHODS[method].label,
            )  # fmt: skip
        axis.set(xlabel=MEASURES[drift][0])
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[-1].legend(fontsize=7)
    figure.suptitle(f"{block.name}: mean over seeds, 95% intervals; a method's points are its learning rates")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick grid (a first look, under 20 minutes)")
    parser.add_argument("--blocks", type=int, nargs="+", help="run only these blocks of the grid (by index)")
    parser.add_argument("--output_dir", help="(default: benchmarks/results/compare_methods[_quick])")
    cli = parser.parse_args()
    grid_name = "quick" if cli.quick else "default"
    grid = GRIDS[grid_name]
    block_indices = cli.blocks if cli.blocks is not None else list(range(len(grid.blocks)))
    output_dir = Path(cli.output_dir or f"benchmarks/results/compare_methods{'_quick' if cli.quick else ''}")
    output_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    results = run_grid(grid, block_indices, resolve_model("embedded:SmolLM2-135M-Instruct"))
    summaries = {index: summarise_block(results, grid, index) for index in block_indices}
    wall_seconds = sum(r["wall_seconds"] for r in results["runs"])
    text = report(results, grid, summaries, wall_seconds)
    (output_dir / "results.md").write_text(text)
    (output_dir / "results.json").write_text(
        json.dumps(
            {
                "grid": grid_name,
                "runs": results["runs"],
                "base": results["base"],
                "summaries": {grid.blocks[i].name: s for i, s in summaries.items()},
                "wall_seconds_of_runs": wall_seconds,
                "wall_seconds_of_this_call": time.perf_counter() - started,
            },
            indent=1,
        )
    )
    for index, summary in summaries.items():
        plot_block(summary, grid.blocks[index], output_dir / f"accuracy_vs_drift_{grid.blocks[index].name}.png")
    print(text)


if __name__ == "__main__":
    main()
