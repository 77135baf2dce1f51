"""Bad input refused before a run loads or prepares anything, with the value and the fix in the message."""

import os
import tempfile
from pathlib import Path

import torch
import transformers
from accelerate.utils import DistributedType, is_peft_model, parse_choice_from_env, parse_flag_from_env
from datasets import IterableDataset
from trl.data_utils import is_conversational

from .cache import cache_root
from .config import REFERENCE_LOSS_TYPES
from .data.dataset_checks import check_dataset
from .data.sources import looks_like_path
from .errors import InputError
from .reference.models import check_model_tokenizer

logger = transformers.utils.logging.get_logger(__name__)


def is_peft_model_or_path(model: "str | torch.nn.Module") -> bool:
    return not isinstance(model, str) and is_peft_model(model)


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output directory that cannot be written, without creating it: a run would otherwise train until its
    first save and lose the compute."""
    existing = next(path for path in (output_dir, *output_dir.parents) if path.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".minorsft-write-check-"):
            pass
    except OSError as error:
        raise InputError(
            f"output_dir={str(output_dir)!r} cannot be written ({error.strerror or error}: {str(existing)!r}): the "
            "run would fail at its first save. Choose a writable `output_dir`."
        ) from error


# What a run leaves in its output directory (the model as saved, its state, its checkpoints)
RUN_FILES = ("trainer_state.json", "adapter_config.json", "config.json", "training_args.bin")


def check_no_run_overwritten(output_dir: Path, resume_from_checkpoint, overwrite_output_dir: bool) -> None:
    """Refuse, on the command line, to train into an `output_dir` that holds a run (its model, state or
    checkpoints), unless the run is resumed or `overwrite_output_dir` says to train over it: re-running a command by
    accident would replace its adapter, checkpoints and model card and add a second run to its logs."""
    if resume_from_checkpoint or overwrite_output_dir or not output_dir.is_dir():
        return
    found = sorted(path.name for path in output_dir.iterdir() if path.name in RUN_FILES)
    found += sorted((path.name for path in output_dir.glob("checkpoint-*") if path.is_dir()), key=len)[:2]
    if found:
        raise InputError(
            f"output_dir={str(output_dir)!r} holds a run ({', '.join(found)}): pass --resume_from_checkpoint true to "
            "continue it, --overwrite_output_dir true to train over it, or another --output_dir."
        )


def unwritable(directory: Path) -> str | None:
    """Why `directory` cannot be created or written to, or `None` if it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        return str(error.strerror or error)
    return None


def check_writable(directory: Path) -> None:
    """Refuse a reference cache directory that cannot be created or written."""
    reason = unwritable(directory)
    if reason is not None:
        raise InputError(
            f"The reference cache directory {str(directory)!r} is not writable ({reason}). Set `ref_cache_dir` (or "
            "the MINORSFT_TRL_CACHE environment variable) to a writable directory."
        )


def _check_drift_has_an_eval_split(args, eval_dataset) -> None:
    """The drift settings that only act at evaluations, refused when the run has nothing to evaluate on."""
    if eval_dataset is not None:
        return
    named = {
        name: getattr(args, name)
        for name in ("max_forward_kl", "target_forward_kl", "drift_prompts", "drift_text_dataset")
        if getattr(args, name) is not None
    }
    if named:
        settings = ", ".join(f"{k}={v!r}" for k, v in named.items())
        raise InputError(
            f"{settings}: the drift measures run at evaluations, and this run has no eval dataset. Pass "
            "`eval_dataset` (in a recipe: a test split, or `test_split_size`) with `eval_strategy`, or drop them."
        )


def check_inputs(
    args,
    *,
    model,
    ref_model,
    train_dataset,
    eval_dataset,
    processing_class,
    compute_loss_func,
    quantization_config,
    peft_config,
    formatting_func,
):
    """Errors that must stop a run before it loads or prepares anything."""
    check_launch(args)
    if ref_model is not None and ref_model is model:
        # Checked on the objects as given: `get_peft_model` would inject the adapters into this very model
        raise InputError("`ref_model` is the model being trained. Leave `ref_model` unset to get a frozen reference.")
    check_output_dir(Path(args.output_dir))
    _check_drift_has_an_eval_split(args, eval_dataset)
    for where, value in (
        ("model", model),
        ("ref_model", ref_model),
        ("ref_model_name_or_path", args.ref_model_name_or_path),
    ):
        check_model_path(where, value)
    model_path = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if processing_class is not None and model_path and Path(model_path).is_dir():
        check_model_tokenizer(processing_class, model_path)
    if formatting_func is None:
        check_dataset(train_dataset, "train_dataset", args.dataset_text_field)
        check_dataset(eval_dataset, "eval_dataset", args.dataset_text_field)
    if args.assistant_only_loss and train_dataset is not None:
        check_assistant_only_loss(next(iter(train_dataset)), args.dataset_text_field)
    if (
        train_dataset is not None
        and processing_class is not None
        and getattr(processing_class, "chat_template", None) is None
        and args.chat_template_path is None
        and is_conversational(next(iter(train_dataset)))
    ):
        raise InputError(
            "The dataset is conversational but the tokenizer has no chat template to render it. Set "
            "`chat_template_path` (a .jinja file, or a tokenizer that has a template), or "
            "`processing_class.chat_template`."
        )
    if args.precompute_ref_log_probs:
        check_writable(Path(args.ref_cache_dir or cache_root() / "ref_logps"))
    quantized = (
        quantization_config is not None
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
    )
    if quantized and peft_config is None and not is_peft_model_or_path(model):
        raise InputError(
            "The model is quantized (4-bit or 8-bit) but no `peft_config` was given: quantized weights cannot be "
            "trained directly. Pass a `peft_config` (e.g. `peft.LoraConfig(...)`, or `--use_peft` in a recipe) to "
            "train LoRA adapters on top of it (QLoRA)."
        )
    if args.precompute_ref_log_probs and (
        isinstance(train_dataset, IterableDataset)
        or any(
            isinstance(d, IterableDataset)
            for d in (eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset])
        )
    ):
        raise InputError(
            "precompute_ref_log_probs=True needs map-style datasets: a streaming (IterableDataset) dataset cannot be "
            "gone through before training. Load the data without streaming, or set precompute_ref_log_probs=False."
        )
    if ref_model is not None and args.ref_model_name_or_path is not None:
        raise InputError(
            f"Both `ref_model` and `ref_model_name_or_path={args.ref_model_name_or_path!r}` are set: keep one."
        )
    if args.uses_reference and args.packing and args.packing_strategy != "bfd":
        raise InputError(
            f"packing_strategy={args.packing_strategy!r} splits examples that do not fit into fragments (or cuts them "
            f"mid-sequence), and loss_type={args.loss_type!r} would count each fragment as an example. Use "
            "packing_strategy='bfd' (the default), which packs whole examples and truncates over-long ones."
        )
    if args.loss_type not in REFERENCE_LOSS_TYPES:
        return
    if compute_loss_func is not None:
        raise InputError(
            f"`compute_loss_func` replaces the loss, which contradicts loss_type={args.loss_type!r}. Drop one of them."
        )
    if args.label_smoothing_factor > 0:
        raise InputError(
            f"label_smoothing_factor={args.label_smoothing_factor} is not supported with loss_type="
            f"{args.loss_type!r}. Set `label_smoothing_factor=0`."
        )
    check_parallelism(args, args.parallelism_config)


def check_parallelism(args, parallelism) -> None:
    """Refuse tensor, context and sequence parallelism for the reference losses. Called with the training arguments'
    `parallelism_config` before anything loads, and again with the one the `Accelerator` really holds (set through
    accelerate's config file or environment, it never reaches the training arguments)."""
    if args.loss_type not in REFERENCE_LOSS_TYPES or parallelism is None:
        return
    if parallelism.tp_enabled or parallelism.cp_enabled or parallelism.sp_enabled:
        raise InputError(
            f"loss_type={args.loss_type!r} does not support tensor, context or sequence parallelism, which split one "
            f"example across processes (got tp_size={parallelism.tp_size}, cp_size={parallelism.cp_size}, "
            f"sp_size={parallelism.sp_size}). Use data parallelism (DDP, FSDP, DeepSpeed ZeRO): remove "
            "`parallelism_config` from the training arguments and the accelerate config."
        )


def check_assistant_only_loss(first_row: dict, text_field: str) -> None:
    """`assistant_only_loss` reads the assistant turns of conversations: refuse it on other data with the fix for
    that data (TRL says only that the dataset is not conversational)."""
    if is_conversational(first_row):
        return
    if "prompt" in first_row and "completion" in first_row:
        raise InputError(
            "assistant_only_loss=True needs conversations, and this dataset is prompt-completion, where the loss is "
            "already on the completion alone (`completion_only_loss`, on by default): drop `assistant_only_loss`."
        )
    raise InputError(
        f"assistant_only_loss=True needs conversations (a `messages` column of role/content turns, or ShareGPT's "
        f"`conversations`), and this dataset has {sorted(first_row)}: convert it to `messages` (the loss then falls "
        f"on the assistant turns), or drop `assistant_only_loss` to train on every token of `{text_field}`."
    )


def check_model_path(where: str, value) -> None:
    """Refuse a model named by a local path that does not exist, which transformers reports as a malformed Hub id."""
    if isinstance(value, str) and looks_like_path(value) and not Path(value).expanduser().exists():
        raise InputError(
            f"{where}={value!r}: no such folder (relative paths are read from {os.getcwd()}). Give the folder "
            "`save_pretrained` wrote (with its config.json), or a Hub model id such as 'org/name'."
        )


def check_adapter_targets(model: "torch.nn.Module") -> None:
    """Refuse a PEFT adapter whose `target_modules` list names a module the model does not have: PEFT stops only when
    no name matches, so a typo in one of them (`[q_proj, v_prj]`) would train the others alone."""
    config = model.peft_config[model.active_adapter]
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, list | set | tuple):
        return  # "all-linear", a regular expression, or a PEFT type without targets
    targeted = getattr(model.base_model, "targeted_module_names", [])
    missing = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in targeted))
    if missing:
        adapters = set(model.peft_config)
        modules = [(name, module) for name, module in model.named_modules() if not adapters & set(name.split("."))]
        raise InputError(_unmatched_targets(config.peft_type.value, targets, missing, modules))


def check_lora_targets_before_loading(model_name_or_path: str, model_args) -> None:
    """`check_adapter_targets` for a recipe's `lora_target_modules`, before any weight is loaded: against the module
    names of the model built from its `config.json` on the meta device (no memory, no download). A model whose
    configuration is not on this machine (a Hub id not yet downloaded, an `embedded:` model not yet converted) is
    checked after loading instead, and so is any model under ZeRO-3."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    targets = model_args.lora_target_modules
    if not model_args.use_peft or not isinstance(targets, list) or targets == ["all-linear"]:
        return
    if is_deepspeed_zero3_enabled():
        return  # a model built under ZeRO-3 is partitioned as it is built, which the meta device cannot hold

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return
    names = [name for name, _ in skeleton.named_modules()]
    missing = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
    if missing:
        raise InputError(_unmatched_targets("LORA", targets, missing, list(skeleton.named_modules())))


def _unmatched_targets(peft_type: str, targets, missing: list[str], modules) -> str:
    """The message for adapter targets that match no module; `modules`: `(name, module)` of the model."""
    linear = sorted(
        {
            parts[-2] if parts[-1] == "base_layer" else parts[-1]  # a layer PEFT wrapped: its own name
            for name, module in modules
            if isinstance(module, torch.nn.Linear) and (parts := name.split("."))
        }
    )
    return (
        f"{peft_type} target_modules {missing} match no module of the model, so the adapter would train only "
        f"{sorted(set(targets) - set(missing))}. The model's linear layers are named {linear}: fix the names "
        "(`lora_target_modules` in a recipe), or use 'all-linear'."
    )


def check_launch(args) -> None:
    """Refuse a launch that would not run as launched: processes that are not one training (`accelerate launch
    --num_processes 2` of a multi-GPU config on a machine without GPUs, without `use_cpu`: each trains alone, on all
    the data, all writing one output directory), an FSDP config that accelerate runs as plain data parallelism (it
    enables FSDP on accelerators only), and a DeepSpeed launch whose mixed precision the training arguments do not
    say (DeepSpeed stops at the first step)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    distributed_type = args.distributed_state.distributed_type
    if launched > 1 and (args.world_size == 1 or distributed_type == DistributedType.NO):
        raise InputError(
            f"This process is one of {launched} launched processes (WORLD_SIZE={launched}), but it trains alone "
            f"(world size {args.world_size}, distributed type {distributed_type.value}): each process would train on "
            "all the data and write the same output directory. On a machine without GPUs set `use_cpu: true` in the "
            "recipe (or `--use_cpu true`) so the processes train together over gloo; elsewhere check that every "
            "process sees its device."
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and distributed_type != DistributedType.FSDP:
        raise InputError(
            f"The accelerate config asks for FSDP, but accelerate runs FSDP on GPUs (and other accelerators) only: "
            f"here it would run distributed type {distributed_type.value}, every process holding the whole model, "
            "without a word. On a machine without GPUs launch with `--config_file accelerate_configs/ddp.yaml` for "
            "data parallelism, or `accelerate_configs/zero3.yaml` to shard the model (DeepSpeed runs on a CPU; see "
            "the README's 'Several processes')."
        )
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        launched_precision = parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")
        requested = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        if launched_precision != requested:
            recipe_fix = (
                f"`{launched_precision}: true`" if launched_precision != "no" else "`bf16: false` and `fp16: false`"
            )
            raise InputError(
                f"DeepSpeed trains in the accelerate config's mixed_precision={launched_precision!r}, and the "
                f"training arguments say bf16={args.bf16}, fp16={args.fp16}: DeepSpeed would stop at the first step "
                f"on the mismatch. Pass `--mixed_precision {requested}` to `accelerate launch` (or set "
                f"`mixed_precision: {requested}` in the config), or set {recipe_fix} in the recipe."
            )


def check_recipe_keys(path: str) -> None:
    """Refuse a YAML recipe that sets a key twice (YAML keeps the last value silently, so the first one, which the
    reader may be looking at, would not be what runs) or that is not valid YAML (a tab, say), naming the line."""
    import yaml

    class DuplicateKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise InputError(
                        f"The recipe {path} sets `{key}` twice (line {key_node.start_mark.line + 1} repeats it): "
                        "YAML would keep only the last value. Keep one."
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    with open(path, encoding="utf-8") as recipe:
        try:
            yaml.load(recipe, Loader=DuplicateKeyLoader)  # noqa: S506 (a SafeLoader)
        except (yaml.scanner.ScannerError, yaml.parser.ParserError) as error:
            mark = error.problem_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
            tab = " YAML indents with spaces, never tabs: replace the tab." if "\\t" in str(error.problem) else ""
            raise InputError(
                f"The recipe {path} is not valid YAML at {where}: {error.problem}.{tab} Each line is `key: value`."
            ) from error


def check_prepared_dataset(given, prepared, max_length) -> None:
    """TRL drops the examples that truncation leaves without answer tokens: say so, and stop if none is left.
    `given`: the training dataset as the trainer got it; `prepared`: as TRL prepared it (neither packed)."""
    num_dropped = len(given) - len(prepared)
    if len(prepared) == 0:
        raise InputError(
            f"All {len(given)} training examples lost their answer tokens to truncation at max_length={max_length}: "
            "nothing is left to train on. Raise `max_length` (or set it to None), or shorten the prompts."
        )
    if num_dropped:
        logger.warning(
            f"{num_dropped} of {len(given)} training examples lost all their answer tokens to truncation at "
            f"max_length={max_length} and were dropped. Raise `max_length` to keep them."
        )
