"""Which loss drifts least for what it learns? The BIG-bench presets of `minorsft-trl compare`: plain SFT, Minor SFT
and the reference-regularised family, over seeds, learning rates, two task kinds and both LoRA and full fine-tuning.

    python benchmarks/compare_methods.py --quick   # a first look: 1 task, 4 methods + control, 2 seeds
    python benchmarks/compare_methods.py           # the default grid, 57 runs on the embedded SmolLM2-135M-Instruct
    python benchmarks/compare_methods.py --preset long   # the paper's regime: 350 steps, best learning rates, clipping
    python benchmarks/compare_methods.py --preset anchor # SFT + KL: the precomputed anchor against the exact one
    python benchmarks/compare_methods.py --preset budget --seeds 0  # budgets steered against fixed coefficients

A preset is a list of blocks; a block is one task and one kind of fine-tuning (a recipe, written to
`<output_dir>/<block>/recipe.yaml`) with methods x learning rates x seeds, run by `minorsft_trl.drift.compare` exactly
as `minorsft-trl compare --config <output_dir>/<block>/recipe.yaml ...` would run it. Every run is cached as it
finishes: an interrupted grid resumes where it stopped, and a grid can be run in pieces (`--blocks 0 2`). Outputs:
`<output_dir>/<block>/{results.md,results.json,accuracy_vs_drift.png}` and `<output_dir>/results.md`, all blocks.
"""

import argparse
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from datasets import Dataset

from minorsft_trl.data import bigbench
from minorsft_trl.drift import report
from minorsft_trl.drift.compare import Comparison, make_grid
from minorsft_trl.drift.grid import base_method

MODEL = "embedded:SmolLM2-135M-Instruct"
SI_CONVERSION = "bigbench:unit_conversion/si_conversion"
# Exact-match generation of another kind: the model must write the answer (a count, "four" or "4"), not pick a
# choice; the base model scores 0% on its prompts (it does not answer in the form), so the task measures learning
COUNTING = "bigbench:object_counting"
METHOD_SETTINGS = {
    "minor_sft": {"beta": 0.04},
    "sft_dpo": {"beta": 0.04},
    "asft": {"kl_coef": 0.05},
    "sft_kl": {"kl_coef": 0.05},
    "iw_sft": {"iw_weight_max": 16.0},
}
FINETUNING = {"lora": "LoRA r=16 on all linear layers", "full": "full fine-tuning"}


@dataclass(frozen=True)
class Block:
    task: str
    finetuning: str  # "lora" or "full"
    methods: tuple[str, ...]
    learning_rates: tuple[float, ...]
    step_control: float | bool = False  # the Minor SFT learning rate whose mean step the control takes
    variant: str = ""  # what sets the block apart from another of the same task and fine-tuning, in its name
    settings: dict = field(default_factory=dict)  # recipe keys of every run of the block (e.g. max_grad_norm)
    method_settings: dict = field(default_factory=dict)  # the block's own METHOD_SETTINGS entries
    kl_coefs: tuple[float, ...] | None = None  # fixed KL anchor coefficients of the KL methods (`--kl_coefs`)
    budgets: tuple[float, ...] | None = None  # budgets their coefficient is steered to (`--target_forward_kls`)

    @property
    def name(self) -> str:
        name = f"{self.task.removeprefix(bigbench.SCHEME).replace('/', '-')}-{self.finetuning}"
        return f"{name}-{self.variant}" if self.variant else name


@dataclass(frozen=True)
class Preset:
    blocks: tuple[Block, ...]
    seeds: tuple[int, ...]
    train_size: int
    test_size: int
    drift_prompts: int
    drift_texts: int
    # (block a, block b, method) each: the method's runs of block b against its runs of block a, paired by seed
    paired_blocks: tuple[tuple[int, int, str], ...] = ()
    # A BIG-bench task no run trains on, scored before and after each run (`--other_task`): what it forgot
    other_task: str | None = None
    other_task_questions: int = 200


LONG_RATES = (1e-4, 5e-4, 2.5e-3)
# Issue 33: a drift budget that steers the KL anchor's coefficient, beside fixed coefficients. 1000 training questions
# (125 steps at batch 8), LoRA, one learning rate on the accuracy plateau (5e-4: 98% at 350 steps); plain SFT is the
# coefficient 0. The budgets evaluate every 12 steps (10 calibrations of the controller); the fixed coefficients are
# measured once, at the end (what they would cost a user). emoji_movie, which no run trains on, measures forgetting:
# the base model answers 58% of it (chance 20%)
BUDGET_BLOCK_BUDGETS = (0.25, 0.5, 1.0)
BUDGET_EVALUATION = {"eval_strategy": "steps", "eval_steps": 12}
PRESETS = {
    # 57 runs: 2 learning rates per method (the matched-accuracy interpolation needs two), 200 training questions, full
    # fine-tuning for SFT and Minor SFT at one learning rate, the second task for SFT and Minor SFT only, the step-size
    # control at one learning rate
    "default": Preset(
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
        drift_prompts=32,
        drift_texts=32,
    ),
    "quick": Preset(
        blocks=(Block(SI_CONVERSION, "lora", ("sft", "minor_sft", "asft", "iw_sft"), (1e-3,), 1e-3),),
        seeds=(0, 1),
        train_size=96,
        test_size=100,
        drift_prompts=16,
        drift_texts=16,
    ),
    # The paper's regime (issue 23): every training question of the task (2800, 350 steps at batch 8), one epoch,
    # LoRA; 3 learning rates a factor 5 apart per method, on one seed (about 10 min per run: 3 seeds did not fit in
    # 2 hours); clipping at TRL's default and off; a larger beta; a finer grid where accuracy climbs. Blocks of one
    # recipe share their runs through the cache (SFT of block 0 is SFT of blocks 2 and 3)
    "long": Preset(
        blocks=(
            Block(SI_CONVERSION, "lora", ("sft", "minor_sft", "sft_kl"), LONG_RATES),
            Block(
                SI_CONVERSION,
                "lora",
                ("sft", "minor_sft"),
                LONG_RATES,
                variant="no-clipping",
                settings={"max_grad_norm": 0.0},
            ),
            Block(
                SI_CONVERSION,
                "lora",
                ("sft", "minor_sft"),
                LONG_RATES,
                variant="beta-0.1",
                method_settings={"minor_sft": {"beta": 0.1}},
            ),
            # A rate between the two where accuracy climbs to its plateau: drift at matched accuracy interpolates
            # between neighbours a factor 2.3 apart, not 5
            Block(SI_CONVERSION, "lora", ("sft", "minor_sft"), (1e-4, 2.2e-4, 5e-4), variant="finer-rates"),
        ),
        seeds=(0,),
        train_size=2800,
        test_size=200,
        drift_prompts=32,
        drift_texts=32,
    ),
    # Issue 32: SFT + KL with its anchor precomputed (the recipe's precompute on: the default ref_top_k = 1024 and
    # ref_tail_samples = 32 draws from the rest) against the exact anchor over the whole vocabulary on the fly, on the
    # default grid's settings (25 steps, both learning rates, 3 seeds; 12 runs, about 40 min on 2 CPU cores); then the
    # same k without draws (the KL coarsened to the top 64 tokens and the rest) at the higher rate (3 runs)
    "anchor": Preset(
        blocks=(
            Block(SI_CONVERSION, "lora", ("sft_kl",), (2.5e-4, 1e-3)),
            Block(
                SI_CONVERSION,
                "lora",
                ("sft_kl",),
                (2.5e-4, 1e-3),
                variant="exact-anchor",
                method_settings={"sft_kl": {"kl_coef": 0.05, "precompute_ref_log_probs": False}},
            ),
            Block(
                SI_CONVERSION,
                "lora",
                ("sft_kl",),
                (1e-3,),
                variant="top-64-no-draws",
                method_settings={"sft_kl": {"kl_coef": 0.05, "ref_tail_samples": 0}},
            ),
        ),
        seeds=(0, 1, 2),
        train_size=200,
        test_size=200,
        drift_prompts=32,
        drift_texts=32,
        paired_blocks=((1, 0, "sft_kl"), (1, 2, "sft_kl")),
    ),
    "budget": Preset(
        blocks=(
            Block(
                SI_CONVERSION,
                "lora",
                ("sft", "sft_kl"),
                (5e-4,),
                kl_coefs=(0.02, 0.05, 0.2, 0.5),
                budgets=BUDGET_BLOCK_BUDGETS,
                method_settings={f"sft_kl-budget{b:g}": BUDGET_EVALUATION for b in BUDGET_BLOCK_BUDGETS},
            ),
        ),
        seeds=(0, 1, 2),
        train_size=1000,
        test_size=200,
        drift_prompts=32,
        drift_texts=32,
        other_task="bigbench:emoji_movie",
        other_task_questions=100,
    ),
}


OUTPUT_DIRS = {
    "default": "benchmarks/results/compare_methods",
    "quick": "benchmarks/results/compare_methods_quick",
    "long": "benchmarks/results/compare_long_horizon",
    "anchor": "benchmarks/results/compare_kl_anchor",
    "budget": "benchmarks/results/compare_budget",
}


def recipe(block: Block, preset: Preset, texts: Path) -> dict:
    """The block's recipe, as a user would write it for `minorsft-trl compare`."""
    values = {
        "model_name_or_path": MODEL,
        "dtype": "float32",
        "use_peft": block.finetuning == "lora",
        "dataset_name": block.task,
        "bigbench_test_size": preset.test_size,
        "test_split_seed": 42,  # the held-out questions of the published results
        "max_train_examples": preset.train_size,
        "max_length": 256,
        # LoRA: one reference pass over the data, shared by the runs that read per-example log-probs (the KL losses
        # precompute their anchor in it too). Not for full fine-tuning: there it would release the reference copy,
        # and the forward KL would be the sampled-token estimate
        "precompute_ref_log_probs": block.finetuning == "lora",
        "lr_scheduler_type": "linear",
        "warmup_steps": 0.1,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "bf16": False,
        "logging_steps": 1,
        "disable_tqdm": True,
        "output_dir": "outputs/comparison",
    }
    if block.finetuning == "lora":
        values.update(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules="all-linear")
    values.update(block.settings)
    # The trainer's drift measures: forward KL on the base model's samples for held-out prompts, NLL change on text
    values.update(
        drift_num_prompts=preset.drift_prompts,
        drift_max_new_tokens=48,
        drift_text_dataset=str(texts),
        drift_num_texts=preset.drift_texts,
    )
    return values


def held_out_texts(path: Path, count: int, seed: int = 42) -> Path:
    """`count` BIG-bench `gem/xsum` news articles (no task's training data) as a `text` column, for the NLL change."""
    texts = bigbench.task_texts("gem/xsum")
    random.Random(seed).shuffle(texts)
    # Written aside and moved in whole: a second process of the same grid may be reading the file
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    Dataset.from_dict({"text": texts[:count]}).to_json(partial)
    os.replace(partial, path)
    return path


def across_blocks(best_rows: list[tuple[Block, dict]]) -> str:
    """Every block's methods at their best learning rates in one table, a method labelled with what its block sets
    for it (the same runs, shared by blocks through the cache, appear once)."""
    rows, seen = [], set()
    for block, row in best_rows:
        own = block.settings or row["method"] in block.method_settings
        name = report.best_label(row)[0] + (f" ({block.variant.replace('-', ' ')})" if own and block.variant else "")
        if name not in seen:
            seen.add(name)
            rows.append((name, row["learning_rate"], row))
    measures = [m for m in report.MEASURES if all(m in row for _, _, row in rows)]
    table = "\n".join(report.measures_table(rows, measures))
    return f"## Every block, each method at its best learning rate (* = at the edge of the grid)\n\n{table}\n"


def paired_across_blocks(preset: Preset, runs: dict[int, list[dict]], first: int, second: int, method: str) -> str:
    """`method` in block `second` minus the same method in block `first`, at each learning rate of the second,
    paired by seed: every measure both blocks have."""
    baseline, compared = report.groups_of(runs[first]), report.groups_of(runs[second])
    names = [preset.blocks[index].variant.replace("-", " ") or "default" for index in (second, first)]
    rows = []
    for (name, learning_rate), group in compared.items():
        if name == method:
            base = baseline[(name, learning_rate)]
            measures = [m for m in report.present(group) if m in report.present(base)]
            rows.append((report.LABELS[name], learning_rate, {m: report.difference(group, base, m) for m in measures}))
    measures = [m for m in report.MEASURES if all(m in row for _, _, row in rows)]
    table = "\n".join(report.measures_table(rows, measures))
    return f"## {report.LABELS[method]}: {names[0]} - {names[1]}, paired by seed\n\n{table}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="default", help="the grid (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="the quick grid (a first look): --preset quick")
    parser.add_argument("--blocks", type=int, nargs="+", help="run only these blocks of the grid (by index)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="these seeds instead of the preset's (fewer first: the runs are cached)"
    )
    parser.add_argument("--output_dir", help=f"(default: {', '.join(OUTPUT_DIRS.values())}, by preset)")
    cli = parser.parse_args()
    name = "quick" if cli.quick else cli.preset
    preset = PRESETS[name]
    indices = cli.blocks if cli.blocks is not None else list(range(len(preset.blocks)))
    output_dir = Path(cli.output_dir or OUTPUT_DIRS[name])

    output_dir.mkdir(parents=True, exist_ok=True)
    texts = held_out_texts(output_dir / "drift_texts.jsonl", preset.drift_texts)
    sections, best_rows, runs = [], [], {}
    for index in indices:
        block = preset.blocks[index]
        block_dir = output_dir / block.name
        block_dir.mkdir(parents=True, exist_ok=True)
        recipe_path = block_dir / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe(block, preset, texts), sort_keys=False))
        known = {**METHOD_SETTINGS, **block.method_settings}
        settings = {m: value for m, value in known.items() if base_method(m) in block.methods}
        if block.kl_coefs is not None:  # the grid sets the coefficient of each run
            settings = {m: {k: v for k, v in value.items() if k != "kl_coef"} for m, value in settings.items()}
        grid = make_grid(
            block.methods,
            block.learning_rates,
            preset.seeds if cli.seeds is None else tuple(cli.seeds),
            block.step_control,
            settings,
            kl_coefs=block.kl_coefs,
            target_forward_kls=block.budgets,
        )
        comparison = Comparison(
            str(recipe_path),
            [],
            grid,
            block_dir,
            other_task=preset.other_task,
            other_task_questions=preset.other_task_questions,
        )
        started = time.perf_counter()
        results = comparison.run(log=lambda line, name=block.name: print(f"{name}: {line}", flush=True))
        text = report.write(results, comparison, time.perf_counter() - started)
        title = f"## {block.task.removeprefix(bigbench.SCHEME)}, {FINETUNING[block.finetuning]}"
        title += f", {block.variant.replace('-', ' ')}" if block.variant else ""
        sections.append(title + "\n\n" + text.removeprefix("# Method comparison\n\n"))
        best_rows += [(block, row) for row in report.summarise(results["runs"], grid)["best"]]
        runs[index] = results["runs"]
    if len(indices) > 1:
        sections.append(across_blocks(best_rows))
    for first, second, method in preset.paired_blocks:
        if {first, second} <= set(runs):
            sections.append(paired_across_blocks(preset, runs, first, second, method))
    summary = "# Method comparison: BIG-bench on the embedded SmolLM2-135M-Instruct\n\n" + "\n".join(sections)
    (output_dir / "results.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
