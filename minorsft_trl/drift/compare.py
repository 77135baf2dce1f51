"""`minorsft-trl compare`: which loss drifts least for what it learns, on your own recipe.

    minorsft-trl compare --config <recipe.yaml or packaged recipe name> --methods sft minor_sft sft_kl \\
        --learning_rates 2.5e-4 1e-3 --seeds 0 1 2 --output_dir compare_out [--grid grid.yaml] [--key value ...]

Every run is the training script (`minorsft_trl.cli.train.main`) on the recipe, with `loss_type`,
`learning_rate`, `seed`/`data_seed` and `output_dir` set per run, then `trainer.evaluate()` once on the held-out split:
its drift measures (`eval_forward_kl`, `eval_deviation`, `eval_nll_change`) and the held-out answer NLL, and the task
accuracy when the held-out split is a task (`choices` + `answer`, or `targets`). The step-size control trains plain
SFT at Minor SFT's learning rate times the mean `minor_weight` of Minor SFT's runs at that learning rate: it separates
the brake's re-weighting from its average scaling of the step.

Every run of a comparison measures the forward KL with one estimator: under `precompute_ref_log_probs` "auto" every
run keeps its reference model, under true every run releases it (the KL losses precompute their anchor under
both).

Every run is cached as it finishes, keyed by the run's resolved recipe, the method, learning rate and seed, and the
content of every local file it reads (model and data folders, the chat template): an interrupted comparison resumes
where it stopped. Runs are in process, one after the other, on one process (no `accelerate launch`). The console shows
a line per run; what a run prints (the trainer's per-step log, warnings) goes to `runs/<run>/train.log`, the run's
folder named by the learning rate it trained at. `results.md` ends with what the comparison says in plain words
(`minorsft_trl.drift.verdict`).
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import glob
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minorsft_trl.cache import cache_root, cached_directory, file_sha256
from minorsft_trl.drift.budget import measured_forward_kl
from minorsft_trl.drift.grid import (
    GRID_KEYS,
    METHODS,
    STEP_CONTROL,
    VARIANT_KEYS,
    CompareError,
    Grid,
    Run,
    base_method,
    budget_of,
    make_grid,
    plan,
    read_grid_file,
    set_by_variants,
)
from minorsft_trl.errors import run_command

# Bump when what a run measures, or how, changes its numbers. 2: the drift prompts end where each answer begins (they
# were the first half of each row), and the reference samples from its own distribution, not its generation_config
EVAL_FORMAT = 2


# The `eval_steps` of a run whose recipe does not evaluate: measured once, after training
ONCE_AT_THE_END = 2**31 - 1

# Settings that name local files or folders: keyed by their content
PATH_FIELDS = {
    "model_name_or_path", "ref_model_name_or_path", "chat_template_path", "dataset_name", "drift_prompts",
    "drift_text_dataset", "deepspeed",
}  # fmt: skip
# Where a run writes and how it reports: not part of what a run computes
UNKEYED_FIELDS = {
    "output_dir", "logging_dir", "run_name", "report_to", "disable_tqdm", "overwrite_output_dir",
    "resume_from_checkpoint", "ref_cache_dir", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
    "hub_private_repo", "hub_always_push", "hub_revision", "save_strategy", "save_steps", "save_total_limit",
    "save_only_model", "save_on_each_node", "save_safetensors", "dataloader_num_workers", "local_rank",
}  # fmt: skip


# ------------------------------------------------------------------ the recipe


def parse_recipe(config: str, overrides: list[str], say_dropped_caps: bool = True):
    """The training script's four dataclasses for `--config <recipe> [--key value ...]`, parsed as strictly as
    `minorsft-trl train` parses them (unknown keys, wrong types and bad values are a `CompareError`), and with the
    recipe's example caps dropped as `train` drops them when the overrides name other data (`drop_caps_of_other_data`,
    which says so unless `say_dropped_caps` is False: the comparison says it once, not once per run)."""
    from minorsft_trl.cli import train as minor_sft
    from minorsft_trl.cli.packaged import resolve_config_argument
    from minorsft_trl.validation import check_recipe_keys

    def refuse(message: str):
        raise CompareError(f"the recipe does not parse: {message}")

    try:
        args = resolve_config_argument(["--config", config, *overrides])
        check_recipe_keys(args[1])
        parser = minor_sft.make_parser()
        parser.error = refuse  # argparse would print the training parser's usage (hundreds of options) and exit
        *configs, config_remaining, cli_remaining = parser.parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True
        )
        if config_remaining:
            raise CompareError(
                f"the recipe does not parse: unknown key(s) in the recipe {args[1]}: {config_remaining}; remove or "
                "fix them."
            )
        if cli_remaining:
            raise CompareError(
                f"the recipe does not parse: unrecognized arguments: {' '.join(cli_remaining)} (neither a compare "
                "option nor a recipe key; `minorsft-trl train -h` lists the recipe keys)."
            )
        minor_sft.check_types(*configs)
        minor_sft.drop_caps_of_other_data(args, configs[0], say=say_dropped_caps)
    except CompareError:
        raise
    except (ValueError, TypeError, OSError, yaml.YAMLError) as error:
        raise CompareError(f"the recipe does not parse: {error}") from error
    return tuple(configs)


def run_overrides(run: Run, grid: Grid, base, output_dir: Path, learning_rate: float) -> list[str]:
    """The command-line overrides that make the recipe this run (what `minorsft-trl train` would take), `base` being
    the recipe's four dataclasses."""
    from minorsft_trl.loss_types import REFERENCE_LOSSES

    method = METHODS["sft" if run.method == STEP_CONTROL else base_method(run.method)]
    settings = grid.settings_of(run.method)
    if REFERENCE_LOSSES.get(method.loss_type) is None:
        settings.setdefault("log_deviation", True)  # plain SFT logs its train deviation too, on the same scale
    args = [
        "--loss_type", method.loss_type, "--learning_rate", repr(learning_rate),
        "--seed", str(run.seed), "--data_seed", str(run.seed),
        "--output_dir", str(run_dir(output_dir, run, learning_rate)), "--save_strategy", "no", "--report_to", "none",
        "--overwrite_output_dir", "true",  # the comparison's own run folder: a run not served from the cache redoes it
        "--disable_tqdm", "true",  # the run's output goes to a file (`RUN_LOG`): a line per log, not a bar's redraws
    ]  # fmt: skip
    if base[1].eval_strategy == "no" and "eval_strategy" not in settings:
        # The script loads the held-out split only when evaluation is on; measure once, after training, not during
        args += ["--eval_strategy", "steps", "--eval_steps", str(ONCE_AT_THE_END)]
    for key, value in settings.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list | dict) else str(value)]
    return args


def run_dir(output_dir: Path, run: Run, learning_rate: float) -> Path:
    """Where the run trained at `learning_rate` writes its model, curves and log."""
    return output_dir / "runs" / run.folder(learning_rate)


def check_recipe(configs) -> None:
    """Refuse a recipe the comparison cannot measure as it is: drift measures turned off, a drift budget (its runs
    save no checkpoint to keep one within it), a streamed dataset."""
    script_args, training_args, _, dataset_args = configs
    if getattr(training_args, "eval_drift", True) is False:
        raise CompareError(
            "the recipe sets eval_drift: false, but the comparison measures drift on every run: "
            "remove it, or pass --eval_drift true."
        )
    if training_args.max_forward_kl is not None:
        raise CompareError(
            f"the recipe sets max_forward_kl={training_args.max_forward_kl:g}, but the comparison trains every run to "
            "its end without checkpoints and measures it there: remove max_forward_kl from the recipe."
        )
    if script_args.dataset_streaming or (dataset_args is not None and dataset_args.streaming):
        raise CompareError("the comparison evaluates on a held-out split it reads whole: turn dataset streaming off.")


def held_out_split(configs):
    """The raw held-out split of the recipe (as the runs evaluate on it); a `CompareError` if it has none."""
    from minorsft_trl.data.sources import load_datasets

    script_args, _, _, dataset_args = configs
    try:
        eval_dataset = load_datasets(script_args, dataset_args, evaluate=True).eval
    except ValueError as error:
        if "Evaluation is on" not in str(error):  # the data itself is wrong: the loader's message says how
            raise CompareError(f"the recipe's data: {error}") from error
        raise CompareError(
            f"every run is measured on a held-out split, and the data ({script_args.dataset_name or 'the mixture'}) "
            f"has no {script_args.dataset_test_split!r} split: set `test_split_size` (e.g. --test_split_size 0.1, or "
            "200 examples) to hold out part of the train split, or `dataset_test_split` to a split the data has."
        ) from error
    return eval_dataset


def other_task_questions(task: str, count: int):
    """`count` questions of the BIG-bench task `task` (`bigbench:<task>`), shuffled with a fixed seed: the questions
    of a task the runs do not train on, scored before and after training. A `CompareError` for a task that is not a
    BIG-bench one, or that `task_accuracy` cannot score."""
    import random

    from datasets import Dataset

    from minorsft_trl.data import bigbench

    check_other_task(task, count)
    examples = bigbench.task_examples(task.removeprefix(bigbench.SCHEME))
    random.Random(42).shuffle(examples)
    dataset = Dataset.from_list(examples[:count])
    if task_kind(dataset) is None:
        raise CompareError(f"--other_task {task!r}: its questions are neither multiple-choice nor exact-match.")
    return dataset


def check_other_task(task: str, count) -> None:
    """Refuse an `--other_task` that is no `bigbench:<task>` name, or a count of questions that is no count."""
    from minorsft_trl.data import bigbench

    if not task.startswith(bigbench.SCHEME):
        raise CompareError(
            f"--other_task {task!r}: give a BIG-bench task as bigbench:<task> (e.g. bigbench:sports_understanding)."
        )
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CompareError(f"--other_task_questions must be an integer >= 1, got {count!r}.")


def task_kind(dataset) -> str | None:
    """`"multiple_choice"`, `"exact_match"` or None: whether `task_accuracy` can score the held-out split."""
    columns = set(dataset.column_names)
    if "prompt" not in columns:
        return None
    if {"choices", "answer"} <= columns:
        return "multiple_choice"
    return "exact_match" if "targets" in columns else None


# ------------------------------------------------------------------ cache keys


def content_key(name: str | None) -> list[str] | str | None:
    """The sha256 of a local file, or of every file of a local folder (`path:sha256`, sorted), else None (a Hub id or
    a `bigbench:` name, keyed by the name itself). Every file counts, whatever its suffix: a chat template, a
    tokenizer's `merges.txt` or a dataset card's `configs:` change what a run computes. Only hidden files and folders
    are left out (`.git`, the `.cache` of a Hub download): no loader reads them, and git's objects change with
    commits that change no file."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    files = sorted(
        file
        for file in path.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    return [f"{file.relative_to(path).as_posix()}:{file_sha256(file)}" for file in files]


def local_path(field_name: str, value: str) -> str:
    """Where a run reads what a setting names, resolved as the training script resolves it: an `embedded:` model's
    converted folder, a `recipes/...` file of a packaged recipe."""
    from minorsft_trl.cli.packaged import resolve_recipe_file
    from minorsft_trl.data.embedded import resolve_model

    return resolve_recipe_file(value) if field_name == "chat_template_path" else resolve_model(value)


def data_files_key(data_files: Any) -> Any:
    """A mixture dataset's `data_files` (a path or glob pattern, a list or a dict of them, relative to the working
    directory as `datasets` reads them with a builder such as `json`) with each local match replaced by the sha256 of
    its content; a pattern that matches no local file (a Hub or remote one) is kept as it is."""
    if isinstance(data_files, dict):
        return {split: data_files_key(files) for split, files in data_files.items()}
    if isinstance(data_files, list | tuple):
        return [data_files_key(files) for files in data_files]
    matches = sorted(Path(match) for match in glob.glob(str(Path(data_files).expanduser()), recursive=True))
    files = [file for file in matches if file.is_file()]
    return {"sha256": [file_sha256(file) for file in files]} if files else data_files


def recipe_key(configs) -> dict:
    """What a run computes from: every value of the four dataclasses but where it writes and how it reports, with
    the local files and folders the recipe names (model, reference, chat template, data) replaced by the sha256 of
    their files (a moved file keeps its runs, an edited one does not)."""
    values = {}
    for name, config in zip(("script", "training", "model", "dataset"), configs, strict=True):
        if config is None:
            continue
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        values[name] = {k: v for k, v in as_dict.items() if k not in UNKEYED_FIELDS}
        for key in PATH_FIELDS & set(values[name]):
            value = values[name][key]
            content = content_key(local_path(key, value)) if isinstance(value, str) else None
            if content is not None:
                values[name][key] = {"sha256": content}
    for dataset in values.get("dataset", {}).get("datasets") or []:
        folder = content_key(dataset.get("path"))
        if folder is not None:
            dataset["path"] = {"sha256": folder}
        # In a local folder they select files of the folder, keyed above; else they are the files themselves
        elif dataset.get("data_files"):
            dataset["data_files"] = data_files_key(dataset["data_files"])
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def cached_result(cache_dir: Path, name: str, key: dict, compute) -> tuple[dict, bool]:
    """`compute()`'s JSON result cached under `name` and `key`, and whether it was computed now."""
    entry_name = f"{name}-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    computed = []

    def build(out: Path) -> None:
        (out / "result.json").write_text(json.dumps(compute()))
        computed.append(True)

    entry = cached_directory(cache_dir / entry_name, key, build)
    return json.loads((entry / "result.json").read_text()), bool(computed)


# ------------------------------------------------------------------ one run


class MissingMeasures(RuntimeError):
    """`trainer.evaluate()` returned no drift measure: the trainer does not measure drift."""


def read_measures(metrics: dict) -> dict:
    """The comparison's measures from `trainer.evaluate()`'s metrics, with the name of the metric each came from."""
    kl_source = next((k for k in ("eval_forward_kl", "eval_forward_kl_sampled") if k in metrics), None)
    if kl_source is None:
        raise MissingMeasures(
            "trainer.evaluate() returned no `eval_forward_kl` (nor `eval_forward_kl_sampled`): this MinorSFTTrainer "
            f"does not measure drift (metrics: {sorted(metrics)}). Update minorsft_trl, and keep `eval_drift` on."
        )
    return {
        "forward_kl": metrics[kl_source],
        "forward_kl_source": kl_source,
        "answer_nll": metrics.get("eval_answer_nll"),
        "heldout_deviation": metrics.get("eval_deviation"),
        "nll_change": metrics.get("eval_nll_change"),
    }


CURVE_KEYS = (
    "step", "loss", "deviation", "grad_norm", "learning_rate", "minor_weight", "minor_weight_min", "kl", "kl_coef",
)  # fmt: skip


def read_log_history(log_history: list[dict], max_grad_norm: float | None) -> dict:
    """Mean `minor_weight`, the last train `deviation`, the fraction of logged steps whose `grad_norm` exceeded the
    clipping bound (where clipping undoes a brake's average scaling: DESIGN.md section 5; 0 with clipping off) and
    the fraction above TRL's default bound whatever the run's (how often the default would have clipped)."""
    from minorsft_trl.config import MinorSFTConfig

    default_bound = MinorSFTConfig.__dataclass_fields__["max_grad_norm"].default
    train = [log for log in log_history if "loss" in log]
    weights = [log["minor_weight"] for log in train if "minor_weight" in log]
    deviations = [log["deviation"] for log in train if "deviation" in log]
    norms = [log["grad_norm"] for log in train if log.get("grad_norm") is not None]
    clipped = over_default = None
    if norms:
        clipped = sum(n > max_grad_norm for n in norms) / len(norms) if max_grad_norm and max_grad_norm > 0 else 0.0
        over_default = sum(n > default_bound for n in norms) / len(norms)
    return {
        "mean_minor_weight": sum(weights) / len(weights) if weights else None,
        "train_deviation": deviations[-1] if deviations else None,
        "clipped_fraction": clipped,
        "grad_norm_over_1": over_default,
        "curve": [{k: log[k] for k in CURVE_KEYS if k in log} for log in train],
        # The forward KL of every evaluation during training (a budget's path to its target)
        "drift_curve": [
            {"step": log["step"], "forward_kl": kl}
            for log in log_history
            if (kl := measured_forward_kl(log)[1]) is not None
        ],
    }


# Each trained run's own output, in its folder
RUN_LOG = "train.log"


@contextlib.contextmanager
def output_to(path: Path):
    """Send all that is written to stdout and stderr meanwhile to the file `path`: the trainer's per-step log, progress
    bars, warnings, library loggers. Below Python (file descriptors 1 and 2), because a logger's handler keeps the
    stream it found at import; and in `sys.stdout` / `sys.stderr`, which need not write to those descriptors (a
    test's capture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    streams = sys.stdout, sys.stderr
    descriptors = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(path, "w") as log:
            for fd in descriptors:
                os.dup2(log.fileno(), fd)
            # Never closed: what a library keeps of them writes to descriptors 1 and 2, the console again, afterwards
            sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in descriptors)  # noqa: SIM115
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        for fd, saved in descriptors.items():
            os.dup2(saved, fd)
            os.close(saved)


def progress(result: dict, computed: bool) -> str:
    """What a run's line on the console says after its name: its gain, its forward KL, and the time it trained."""
    numbers = []
    if result.get("accuracy") is not None:
        numbers.append(f"accuracy {100 * result['accuracy']:.1f}%")
    elif result.get("answer_nll") is not None:
        numbers.append(f"answer NLL {result['answer_nll']:.3f}")
    if result.get("forward_kl") is not None:
        sampled = result.get("forward_kl_source") == "eval_forward_kl_sampled"
        numbers.append(f"forward KL {result['forward_kl']:.4f}" + (" (sampled-token estimate)" if sampled else ""))
    seconds = result.get("wall_seconds")
    took = None if seconds is None else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    if computed:
        when = f"trained in {took}" if took else "trained"
    else:
        when = f"from the cache (trained in {took})" if took else "from the cache"
    return ", ".join(numbers) + "; " + when


def train(configs):
    """One training run: the training script's `main`, which returns the trainer."""
    from minorsft_trl.cli import train as minor_sft

    return minor_sft.main(*configs)


def run_and_measure(configs, eval_dataset, accuracy_kind: str | None, other_task=None) -> dict:
    """Train one run and measure it: `trainer.evaluate()`'s drift and gain measures, the log history, the task
    accuracy on the held-out split (LoRA merged first) when it is a task, and on `other_task`'s questions (a task the
    run never trained on: what it forgot) when given."""
    from minorsft_trl.data.evaluation import task_accuracy

    started = time.perf_counter()
    trainer = train(configs)
    # The recipe's own evaluation at the last step, if it had one, is the final model's: not evaluated again
    final = [
        log for log in trainer.state.log_history if "eval_loss" in log and log["step"] == trainer.state.global_step
    ]
    metrics = final[-1] if final else trainer.evaluate()
    result = {
        **read_measures(metrics),
        **read_log_history(trainer.state.log_history, configs[1].max_grad_norm),
        "eval_metrics": metrics,
    }
    model = trainer.model
    if accuracy_kind is not None or other_task is not None:
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # training is done
    if accuracy_kind is not None:
        accuracy = task_accuracy(model, trainer.processing_class, eval_dataset)
        result["accuracy"] = accuracy.value
        result["accuracy_outcomes"] = [int(outcome) for outcome in accuracy.outcomes]  # for intervals over questions
    if other_task is not None:
        other = task_accuracy(model, trainer.processing_class, other_task)
        result["other_task_accuracy"] = other.value
        result["other_task_outcomes"] = [int(outcome) for outcome in other.outcomes]
    result["wall_seconds"] = time.perf_counter() - started
    del trainer
    gc.collect()
    return result


def base_accuracy(configs, eval_dataset) -> float:
    """The base model's task accuracy on `eval_dataset` (the held-out split, or another task's questions)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minorsft_trl.data.embedded import resolve_model
    from minorsft_trl.data.evaluation import task_accuracy

    model_args = configs[2]
    path = resolve_model(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    model = AutoModelForCausalLM.from_pretrained(path, revision=model_args.model_revision, dtype=model_args.dtype)
    return task_accuracy(model, tokenizer, eval_dataset).value


# ------------------------------------------------------------------ the comparison


@dataclass
class Comparison:
    """The grid, the recipe and where things go: `run()` trains (or reads back) every run."""

    config: str
    overrides: list[str]
    grid: Grid
    output_dir: Path
    cache_dir: Path = field(default_factory=lambda: cache_root() / "comparison")
    # A BIG-bench task none of the runs trains on (`bigbench:<task>`), scored on `other_task_questions` of its
    # questions before and after training: the accuracy a run lost there
    other_task: str | None = None
    other_task_questions: int = 200

    def prepare(self) -> None:
        """Every check that can fail, before any training: the recipe, every run's configuration, the eval split."""
        overridden = {a.removeprefix("--").split("=")[0] for a in self.overrides if a.startswith("--")}
        forced = sorted(overridden & set(GRID_KEYS))
        if forced:
            raise CompareError(f"--{forced[0]} is set per run by the grid: use {GRID_KEYS[forced[0]]} instead.")
        varied = sorted(overridden & set_by_variants(self.grid.methods))
        if varied:
            raise CompareError(
                f"--{varied[0]} is set per run by {VARIANT_KEYS[varied[0]]}: give the values there, not both."
            )
        self.base = parse_recipe(self.config, self.overrides)
        check_recipe(self.base)
        # Every run's recipe parses (a method setting it cannot take is an error now, not after hours of training)
        for run in plan(self.grid):
            training_args = self.run_configs(run, run.learning_rate)[1]
            if budget_of(run.method) is not None and training_args.eval_steps == ONCE_AT_THE_END:
                raise CompareError(
                    f"{run.method}: a budget steers on evaluations during training, and the recipe sets "
                    "eval_strategy: no. Add --eval_strategy steps --eval_steps N (about a tenth of the run's steps), "
                    f"or set them for the budgets alone (method_settings: {{{run.method}: {{eval_strategy: steps, "
                    "eval_steps: N}}})."
                )
        self.eval_dataset = held_out_split(self.base)
        self.accuracy_kind = task_kind(self.eval_dataset)
        self.other_dataset = None
        if self.other_task is not None:
            self.other_dataset = other_task_questions(self.other_task, self.other_task_questions)

    def run_configs(self, run: Run, learning_rate: float):
        args = run_overrides(run, self.grid, self.base, self.output_dir, learning_rate)
        return parse_recipe(self.config, [*self.overrides, *args], say_dropped_caps=False)

    def run(self, log=print) -> dict:
        if not hasattr(self, "base"):
            self.prepare()
        results = {"base": {}, "runs": []}
        base_key = {"format": EVAL_FORMAT, "base": recipe_key(self.base)}
        if self.accuracy_kind is not None:
            base_key["base"]["training"] = {}  # the base model's accuracy does not depend on training settings
            value, _ = cached_result(self.cache_dir, "base", base_key, self.measure_base)
            results["base"]["accuracy"] = value["accuracy"]
            log(f"base model: held-out accuracy {100 * value['accuracy']:.1f}%")
        if self.other_dataset is not None:
            other_key = {**base_key, "other_task": self.other_task_key}
            value, _ = cached_result(self.cache_dir, "base-other-task", other_key, self.measure_base_other_task)
            results["base"]["other_task"] = self.other_task
            results["base"]["other_task_accuracy"] = value["accuracy"]
            log(f"base model: accuracy on {self.other_task} (no run trains on it) {100 * value['accuracy']:.1f}%")
        log(f"One line per run; each run's own log goes to {self.output_dir}/runs/<run>/{RUN_LOG}.")
        planned = plan(self.grid)
        for number, run in enumerate(planned, start=1):
            learning_rate = run.learning_rate
            if run.method == STEP_CONTROL:
                learning_rate *= self.mean_minor_weight(results["runs"], run.learning_rate)
            heading = f"[{number}/{len(planned)}] {run.method} lr={learning_rate:.3g} seed={run.seed}"
            result, computed = self.train_or_read(run, learning_rate, heading, log)
            log(f"{heading}: {progress(result, computed)}")
            # `wall_seconds` is the run's own, stored in its cache entry: the time it took when it was trained
            results["runs"].append(
                {**dataclasses.asdict(run), **result, "trained_lr": learning_rate, "from_cache": not computed}
            )
        return results

    def measure_base(self) -> dict:
        """The base model's held-out accuracy, its output (model loading, evaluation) in `runs/base_model.log`."""
        with output_to(self.output_dir / "runs" / "base_model.log"):
            return {"accuracy": base_accuracy(self.base, self.eval_dataset)}

    def measure_base_other_task(self) -> dict:
        """The base model's accuracy on the other task's questions."""
        with output_to(self.output_dir / "runs" / "base_model_other_task.log"):
            return {"accuracy": base_accuracy(self.base, self.other_dataset)}

    @functools.cached_property
    def other_task_key(self) -> dict | None:
        """What the other task's score depends on: its name and questions."""
        if self.other_dataset is None:
            return None
        questions = hashlib.sha256(json.dumps(self.other_dataset.to_list(), sort_keys=True).encode()).hexdigest()
        return {"task": self.other_task, "questions": questions}

    def train_or_read(self, run: Run, learning_rate: float, heading: str, log) -> tuple[dict, bool]:
        """The run's result, read from the cache or trained now with all it prints in its folder's log, and whether
        it was trained now. A run that fails says so, and where its log is, before its error goes on."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # `prepare` parsed every run's recipe and showed its warnings once
            configs = self.run_configs(run, learning_rate)
        key = {
            "format": EVAL_FORMAT,
            "method": run.method,
            "lr": learning_rate,
            "seed": run.seed,
            "recipe": recipe_key(configs),
        }
        if self.other_dataset is not None:
            key["other_task"] = self.other_task_key
        log_file = run_dir(self.output_dir, run, learning_rate) / RUN_LOG

        def train_and_measure() -> dict:
            try:
                with output_to(log_file):
                    return run_and_measure(configs, self.eval_dataset, self.accuracy_kind, self.other_dataset)
            except (KeyboardInterrupt, SystemExit):
                log(
                    f"{heading}: interrupted (its log: {log_file}); the runs done are cached, the same command resumes"
                )
                raise
            except BaseException:
                log(f"{heading}: failed (its log: {log_file})")
                raise

        return cached_result(self.cache_dir, run.name, key, train_and_measure)

    @staticmethod
    def mean_minor_weight(runs: list[dict], learning_rate: float) -> float:
        weights = [
            r["mean_minor_weight"]
            for r in runs
            if r["method"] == "minor_sft"
            and r["learning_rate"] == learning_rate
            and r.get("mean_minor_weight") is not None
        ]
        if not weights:
            raise RuntimeError(
                f"no minor_sft run at lr {learning_rate:g} logged `minor_weight`: no step-size control."
            )
        return sum(weights) / len(weights)


# ------------------------------------------------------------------ the command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CompareError(message)


def make_parser(prog: str = "minorsft-trl compare") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        description="Compare fine-tuning methods on a recipe: methods x learning rates x seeds, each run trained "
        "and measured (gain, drift from the reference), with 95% t intervals over seeds, differences paired by "
        "seed against SFT, drift at matched gain, the Pareto front and the step-size control. Runs in process, "
        "one after the other, on one process (no `accelerate launch`); every run is cached as it finishes. Any "
        "other `--key value` is a recipe override applied to every run. A line per run on the console, its own log "
        "in runs/<run>/train.log; results.md ends with what the numbers say, in plain words.",
    )
    parser.add_argument("--config", required=True, help="a recipe YAML file or a packaged recipe's name")
    parser.add_argument(
        "--methods", nargs="*", help=f"methods to compare, of: {', '.join(METHODS)} (default: sft minor_sft)"
    )
    parser.add_argument("--learning_rates", nargs="*", help="learning rates (default: the recipe's)")
    parser.add_argument("--seeds", nargs="*", help="training seeds (default: 0 1 2)")
    parser.add_argument(
        "--step_control",
        nargs="+",
        help="the step-size control: on (at the largest learning "
        "rate; the default when sft and minor_sft are compared), off, or Minor SFT learning rate(s)",
    )
    parser.add_argument(
        "--kl_coefs",
        nargs="*",
        help="fixed KL anchor coefficients: sft_kl and asft run once per value (default: the recipe's kl_coef)",
    )
    parser.add_argument(
        "--target_forward_kls",
        nargs="*",
        help="drift budgets (nats/token of eval_forward_kl): sft_kl and asft also run once per budget, their "
        "coefficient steered to it (target_forward_kl; the recipe must evaluate during training)",
    )
    parser.add_argument(
        "--grid",
        help="a YAML file with methods, learning_rates, seeds, step_control, kl_coefs, target_forward_kls, "
        "method_settings (e.g. {minor_sft: {beta: 0.04}}); the command line wins",
    )
    parser.add_argument(
        "--output_dir", required=True, help="where results.md, results.json, the plots and runs/ (a folder per run) go"
    )
    parser.add_argument("--cache_dir", help="the run cache (default: $MINORSFT_TRL_CACHE/comparison)")
    parser.add_argument(
        "--other_task",
        help="a BIG-bench task no run trains on (bigbench:<task>), scored before and after each run: the accuracy "
        "it lost there (forgetting)",
    )
    parser.add_argument(
        "--other_task_questions", type=int, default=200, help="questions of --other_task scored (default: 200)"
    )
    return parser


def comparison_from_args(argv: list[str], prog: str = "minorsft-trl compare") -> Comparison:
    """The `Comparison` a command line asks for (a `CompareError` for bad input)."""
    numbers = {}
    for option in ("--learning_rates", "--kl_coefs", "--target_forward_kls"):
        argv, numbers[option] = _take_numbers(argv, option)
    args, overrides = make_parser(prog).parse_known_args(argv)
    for option, values in numbers.items():
        if values is not None:
            setattr(args, option.removeprefix("--"), values)
    from_file = read_grid_file(args.grid) if args.grid else {}

    def pick(name, default):
        value = getattr(args, name, None)
        return value if value is not None else from_file.get(name, default)

    step_control = pick("step_control", None)
    if isinstance(step_control, list) and len(step_control) == 1 and step_control[0] in ("on", "off"):
        step_control = step_control[0]
    learning_rates = pick("learning_rates", None)
    if learning_rates is None:
        learning_rates = [
            parse_recipe(args.config, [a for a in overrides if a], say_dropped_caps=False)[1].learning_rate
        ]
    seeds = pick("seeds", [0, 1, 2])
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise CompareError(f"seeds must be integers, got {seeds}: fix --seeds.") from None
    grid = make_grid(
        pick("methods", ["sft", "minor_sft"]),
        learning_rates,
        seeds,
        step_control,
        from_file.get("method_settings"),
        kl_coefs=pick("kl_coefs", None),
        target_forward_kls=pick("target_forward_kls", None),
    )
    cache_dir = Path(args.cache_dir) if args.cache_dir else cache_root() / "comparison"
    if args.other_task is not None:
        check_other_task(args.other_task, args.other_task_questions)
    return Comparison(
        args.config,
        overrides,
        grid,
        Path(args.output_dir),
        cache_dir,
        other_task=args.other_task,
        other_task_questions=args.other_task_questions,
    )


def _take_numbers(argv: list[str], option: str) -> tuple[list[str], list[str] | None]:
    """`argv` without `option` and the numbers after it, and those numbers (None without `option`). argparse would
    read `-1e-3` as an option, not as a value: a negative learning rate must reach the check that names it."""
    values = None
    while option in argv:  # the last one wins, as in argparse
        start = argv.index(option) + 1
        end = start
        while end < len(argv) and _is_number(argv[end]):
            end += 1
        argv, values = [*argv[: start - 1], *argv[end:]], argv[start:end]
    return argv, values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str], prog: str = "minorsft-trl compare") -> int:
    """Run `minorsft-trl compare` (the arguments after `compare`): 0 when it ends; 2 and one sentence on stderr for
    bad input, refused before any training (`CompareError`) or met by a run (`InputError`); any other error keeps its
    traceback."""
    return run_command(prog, lambda: run_comparison(argv, prog))


def run_comparison(argv: list[str], prog: str) -> None:
    """Prepare, train or read every run (a line each on the console), write the outputs and print `results.md`,
    which ends with what it says in plain words."""
    from minorsft_trl.drift import report

    started = time.perf_counter()
    comparison = comparison_from_args(argv, prog)
    comparison.prepare()
    if len(comparison.grid.seeds) == 1:
        print(report.ONE_SEED_QUESTIONS if comparison.accuracy_kind else report.ONE_SEED, flush=True)
    results = comparison.run(log=lambda line: print(line, flush=True))
    print(report.write(results, comparison, time.perf_counter() - started), flush=True)
