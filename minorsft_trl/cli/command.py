"""`minorsft-trl`, the console command installed with the package: `trl sft`'s command line for Minor SFT, built from
TRL's CLI pieces (its `Command` classes, its `--accelerate_config` handling, its split of the arguments between the
training script and `accelerate launch`).

    minorsft-trl train --config <recipe.yaml or recipe name> [--accelerate_config <name or path>] [--key value ...]
    minorsft-trl recipes                        # the packaged recipes and accelerate configs
    minorsft-trl recipes copy <name> [<dest>]   # a packaged recipe, as a YAML file to edit
    minorsft-trl compare --config <recipe> --methods sft minor_sft --learning_rates 2.5e-4 1e-3 --seeds 0 1 2 \
        --output_dir compare_out [--grid grid.yaml] [--key value ...]   # the method comparison, in process

`train` launches `minorsft_trl/cli/train.py` through `accelerate launch`, as `trl sft` launches TRL's `sft.py`:
options that are not recipe keys (`--num_processes 2`, `--cpu`, `--mixed_precision no`) go to `accelerate launch`.
"""

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import yaml
from trl.cli.commands.base import Command, CommandContext

from minorsft_trl.cli import packaged
from minorsft_trl.errors import InputError

PROG = "minorsft-trl"
EXAMPLES = """examples:
  minorsft-trl recipes
  minorsft-trl recipes copy SmolLM2-135M-Instruct/minor_sft/config_lora my_recipe.yaml
  minorsft-trl train --config my_recipe.yaml --learning_rate 1e-4
  minorsft-trl train --config Qwen2-7B-Instruct/minor_sft/config_qlora --accelerate_config ddp --num_processes 8
  minorsft-trl train -h    # the keys most runs set (train -h all: every recipe key)
  minorsft-trl compare --config my_recipe.yaml --methods sft minor_sft --learning_rates 2.5e-4 1e-3 --seeds 0 1 2 \\
      --output_dir compare_out"""


class TrainCommand(Command):
    """`trl sft`'s `TrainingCommand`, launching this package's training script with this package's configs."""

    def __init__(self):
        super().__init__(name="train", help_text="Train with Minor SFT (a recipe, overrides, `--accelerate_config`)")

    def register(self, subparsers) -> None:
        subparsers.add_parser(self.name, help=self.help_text, add_help=False)  # `-h` is the training parser's

    def run(self, args: argparse.Namespace, context: CommandContext) -> int:
        from accelerate.commands.launch import launch_command, launch_command_parser
        from trl.cli.commands.training import _subtract_subsequence

        from minorsft_trl.cli import train as minor_sft

        parser = minor_sft.make_parser(prog=f"{PROG} {self.name}")
        argv = context.argv_after(self.name)
        if {"-h", "--help"} & set(argv):
            print(train_help(parser, every_key="all" in argv))
            return 0
        try:
            all_args = packaged.resolve_config_argument(context.argv_after(self.name))
            if "--config" in all_args[:-1]:
                minor_sft.check_recipe_keys(all_args[all_args.index("--config") + 1])
            # As `trl sft`: recipe keys for the script, the rest of the command line for `accelerate launch`
            *configs, config_remaining, cli_remaining = parser.parse_args_and_config(
                all_args, return_remaining_strings=True, separate_remaining_strings=True
            )
            if config_remaining:
                raise InputError(f"Unknown arguments from config file: {config_remaining}. Please remove them.")
            minor_sft.check_types(*configs)
            # What would fail in every launched process, after seconds of start-up, checked here in one line
            minor_sft.check_before_loading(*configs)
            launch_args = resolve_accelerate_config(cli_remaining)
        except ValueError as error:
            return fail(f"{PROG} {self.name}", str(error))
        script = str(Path(minor_sft.__file__).resolve())
        accelerate_args, unknown = launch_command_parser().parse_known_args([*launch_args, script])
        if unknown or accelerate_args.training_script != script:
            return fail(
                f"{PROG} {self.name}",
                f"unrecognized arguments: {' '.join(unknown or cli_remaining)} (neither a recipe key nor an "
                "`accelerate launch` option)",
            )
        accelerate_args.training_script_args = _subtract_subsequence(all_args, cli_remaining)
        # The launched processes' environment (the resume hint repeats the command): this process's is given back
        command = shlex.join([PROG, self.name, *context.argv_after(self.name)])
        with patch.dict(os.environ, {minor_sft.COMMAND_ENV: command}):
            try:
                launch_command(accelerate_args)
            except subprocess.CalledProcessError as error:  # the training process failed and printed why
                return error.returncode
        return 0


# What `train -h` leads with: the keys most runs set, by what they are about (`train -h all`: every key)
COMMON_KEYS = {
    "Model and data": ["model_name_or_path", "dataset_name", "output_dir", "max_length"],
    "Method": ["loss_type", "beta", "kl_coef", "target_forward_kl", "max_forward_kl"],
    "Optimisation": [
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps"
    ],
    "Adapters": ["use_peft", "lora_r", "lora_target_modules", "load_in_4bit"],
    "Evaluation and saving": ["eval_strategy", "eval_steps", "save_strategy", "resume_from_checkpoint"],
}  # fmt: skip
# The dataclasses of the training parser, by what their keys set (`train -h all`)
KEY_GROUPS = {
    "MinorSFTScriptArguments": "Data (the script's arguments)",
    "MinorSFTConfig": "Training (MinorSFTConfig: Minor SFT's, TRL's SFTConfig's and transformers' TrainingArguments')",
    "ModelConfig": "Model, quantization and adapters (TRL's ModelConfig)",
    "DatasetMixtureConfig": "A mixture of datasets (TRL's DatasetMixtureConfig)",
}


def train_help(parser, every_key: bool) -> str:
    """`train -h`: the usage and the keys most runs set, each with its help; with `every_key`, every key of the
    training parser, grouped by the dataclass that holds it."""
    actions = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    groups = COMMON_KEYS
    if every_key:
        groups = {
            KEY_GROUPS[dataclass.__name__]: [key.name for key in dataclasses.fields(dataclass) if key.init]
            for dataclass in parser.dataclass_types
        }
    formatter = parser._get_formatter()
    formatter.add_usage(
        f"{PROG} train --config <recipe.yaml or recipe name> [--accelerate_config <name or path>] [--key value ...]",
        None,
        [],
        prefix="usage: ",
    )
    formatter.add_text(
        "Trains from a recipe: every key of the recipe (YAML) can be given on the command line as --key value, which "
        "wins over the recipe's. Options that are no recipe key go to `accelerate launch` (--num_processes 2, "
        "--mixed_precision bf16)."
    )
    for title, names in groups.items():
        formatter.start_section(title)
        formatter.add_arguments([actions[name] for name in names if name in actions])
        formatter.end_section()
    if not every_key:
        formatter.add_text(f"Every key ({len(actions)} in all), grouped: {PROG} train -h all")
    return formatter.format_help().rstrip()


def resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """TRL's `resolve_accelerate_config_argument` (`--accelerate_config <path or name>` made `--config_file <path>`),
    with this package's configs (`ddp`, `fsdp`, `single_gpu`, `zero2`, `zero3`) looked up before TRL's own; without
    any accelerate config, `accelerate launch`'s own defaults said explicitly (see `with_launch_defaults`)."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    if "--accelerate_config" in launch_args[:-1]:  # with a value (else TRL says it is missing)
        index = launch_args.index("--accelerate_config") + 1
        launch_args = [
            *launch_args[:index],
            packaged.find_accelerate_config(launch_args[index]),
            *launch_args[index + 1 :],
        ]
    try:
        launch_args = resolve_accelerate_config_argument(launch_args)
    except ValueError as error:
        raise InputError(
            f"{error} This package's configs: {', '.join(packaged.accelerate_config_names())}."
        ) from error
    check_cpu_flag(launch_args)
    return with_launch_defaults(launch_args)


def check_cpu_flag(launch_args: list[str]) -> None:
    """Refuse `--cpu` with a DeepSpeed or FSDP config: `accelerate launch --cpu` starts one process without the
    engine, whatever the config and `--num_processes` say, and the run trains as if they were not there."""
    if "--cpu" not in launch_args or "--config_file" not in launch_args[:-1]:
        return
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config_file = launch_args[launch_args.index("--config_file") + 1]
    if not Path(config_file).is_file():
        return  # accelerate says so
    engine = load_config_from_file(config_file).distributed_type
    if engine in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise InputError(
            f"--cpu with {config_file} (distributed_type: {engine.value}): accelerate would start one process "
            f"without {engine.value}, ignoring the config and --num_processes. Drop --cpu: the recipe's "
            "`use_cpu: true` (or `--use_cpu true`) runs the processes on the CPU, with `--num_processes 2 "
            "--mixed_precision no` (see the README's 'Several processes')."
        )


def with_launch_defaults(launch_args: list[str]) -> list[str]:
    """Without an accelerate config (neither `--config_file` nor accelerate's default config file), `accelerate
    launch` fills `--num_machines 1 --mixed_precision no --dynamo_backend no` (and, on a machine without GPUs, one
    process) and prints a block of warnings saying so in every run: pass the same values, so it has nothing to say.
    A value given on the command line is kept; the training arguments still decide bf16 and fp16."""
    from accelerate.commands.config import default_config_file

    if "--config_file" in launch_args or Path(default_config_file).is_file():
        return launch_args
    import torch

    defaults = {"--num_machines": "1", "--mixed_precision": "no", "--dynamo_backend": "no"}
    if not torch.cuda.is_available():
        defaults["--num_processes"] = "1"
    given = {arg.split("=")[0] for arg in launch_args}
    return [*launch_args, *(item for flag, value in defaults.items() if flag not in given for item in (flag, value))]


def fail(prog: str, message: str) -> int:
    """An error without the training parser's usage line (hundreds of options)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class CompareCommand(Command):
    """The method comparison on a recipe (`minorsft_trl.drift.compare`): every run in this process, one after the
    other, on one process (no `accelerate launch`)."""

    def __init__(self):
        super().__init__(
            name="compare",
            help_text="Compare methods x learning rates x seeds on a recipe: gain, drift, intervals (in process, "
            "one process, no accelerate launch)",
        )

    def register(self, subparsers) -> None:
        subparsers.add_parser(self.name, help=self.help_text, add_help=False)  # `-h` is the comparison parser's

    def run(self, args: argparse.Namespace, context: CommandContext) -> int:
        from minorsft_trl.drift import compare

        argv = context.argv_after(self.name)
        if "-h" in argv or "--help" in argv:
            compare.make_parser(f"{PROG} {self.name}").print_help()
            return 0
        return compare.main(argv, prog=f"{PROG} {self.name}")


class RecipesCommand(Command):
    """Lists the packaged recipes; `copy` writes one out to edit it."""

    def __init__(self):
        super().__init__(name="recipes", help_text="List the packaged recipes; `recipes copy <name>` to edit one")

    def register(self, subparsers) -> None:
        parser = subparsers.add_parser(self.name, help=self.help_text, description=self.help_text)
        actions = parser.add_subparsers(dest="action")
        copy = actions.add_parser("copy", help="Copy a packaged recipe (YAML) to edit it")
        copy.add_argument("name", help=f"a recipe's name as `{PROG} recipes` lists it")
        copy.add_argument("dest", nargs="?", default=".", help="a file or a directory (default: the current one)")
        copy.add_argument("--force", action="store_true", help="overwrite an existing file")

    def run(self, args: argparse.Namespace, context: CommandContext) -> int:
        if args.action == "copy":
            return self.copy(args.name, Path(args.dest), args.force)
        print(f"Packaged recipes ({PROG} train --config <name>, or {PROG} recipes copy <name> to edit one):")
        rows = []
        for name in packaged.recipe_names():
            recipe = yaml.safe_load(packaged.find_recipe(name).read_text())
            rows.append((name, str(recipe.get("model_name_or_path") or ""), str(recipe.get("dataset_name") or "")))
        width = max(len(row[0]) for row in rows)
        model_width = max(len(row[1]) for row in rows)
        for name, model, dataset in rows:
            print(f"  {name:<{width}}  {model:<{model_width}}  {dataset}")
        print(f"Accelerate configs (--accelerate_config <name>): {', '.join(packaged.accelerate_config_names())}")
        return 0

    def copy(self, name: str, dest: Path, force: bool) -> int:
        try:
            source = packaged.find_recipe(name)
        except ValueError as error:
            return fail(f"{PROG} recipes copy", str(error))
        if dest.is_dir():
            dest = dest / source.name
        if dest.exists() and not force:
            return fail(
                f"{PROG} recipes copy", f"{dest} exists: pass --force to overwrite it, or another destination."
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        print(f"Wrote {dest}. Edit it, then: {PROG} train --config {dest}")
        return 0


def main(argv: list[str] | None = None) -> int:
    """Run the `minorsft-trl` command (TRL's `trl.cli.main` with this package's commands)."""
    commands = [TrainCommand(), CompareCommand(), RecipesCommand()]
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Minor SFT (arXiv 2408.10642) with TRL, from a recipe: `trl sft`'s command line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(help="available commands", dest="command")
    for command in commands:
        command.register(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command not in ("train", "compare") and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = next(command for command in commands if command.name == args.command)
    return command.run(args, CommandContext(argv=argv))


if __name__ == "__main__":
    raise SystemExit(main())
