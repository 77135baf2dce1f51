"""The train and eval datasets of the Minor SFT script, from wherever the data is.

`dataset_name` may be a local file (`.jsonl`, `.json`, `.csv`, `.parquet`), a local folder of such files (or one
written by `save_to_disk`), a `bigbench:<task>` (see `minorsft_trl.data.bigbench`) or anything `datasets.load_dataset`
reads (a Hub dataset id). A mixture of several datasets is TRL's own: its `DatasetMixtureConfig` (the `datasets:`,
`streaming:` and `test_split_size:` recipe keys of TRL's `sft.py`) loaded by its `get_dataset`; local files are
accepted there too.

When the data has no held-out split, `test_split_size` (a fraction below 1 or a number of examples, as in
alignment-handbook) carves one out of the train split, with a fixed seed, so that every run and every process gets
the same split. The carved split is the same whether or not the run evaluates, so turning evaluation on does not
change the training data.
"""

import codecs
import csv
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple
from unittest.mock import patch

import datasets
import transformers
from datasets import Dataset, DatasetDict, Features, IterableDataset, Value, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError
from trl import DatasetMixtureConfig, ScriptArguments, get_dataset

from ..errors import InputError
from . import bigbench
from .file_checks import check_file_records

logger = transformers.utils.logging.get_logger(__name__)

# Local file types, by the `datasets` builder that reads them
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SUPPORTED = ", ".join(FILE_BUILDERS)


@dataclass
class MinorSFTScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments`, plus the size of the data to use and the seed of a carved held-out split.

    `test_split_size` itself is a field of TRL's `DatasetMixtureConfig` (the fourth dataclass of TRL's `sft.py`):
    argparse refuses the same option in two dataclasses, and it carves the held-out split of a single dataset too.
    """

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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an `output_dir` that holds a run (its model, state or checkpoints), replacing what "
            "the new run writes. The command line refuses such a folder otherwise (`resume_from_checkpoint: true` "
            "continues it instead)."
        },
    )
    test_split_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the shuffle that carves the held-out split when `test_split_size` is set (and that "
            "splits a `bigbench:` task). Apart from the training `seed`, so that runs with different seeds are "
            "evaluated on the same examples."
        },
    )


class DataSplits(NamedTuple):
    """The datasets the trainer takes: `train`, and `eval` (None when the run does not evaluate)."""

    train: Dataset | IterableDataset
    eval: Dataset | IterableDataset | None


def load_datasets(
    script_args: MinorSFTScriptArguments,
    dataset_args: DatasetMixtureConfig | None = None,
    *,
    evaluate: bool,
) -> DataSplits:
    """The train and (if `evaluate`) eval datasets named by the script arguments.

    A mixture (`dataset_args.datasets`) wins over `dataset_name`, as in TRL's `sft.py`; its only split is `train`,
    so `dataset_train_split` and `dataset_test_split` apply to `dataset_name` only. When the eval split is missing
    and `test_split_size` is set, it is carved from the train split (even if the run does not evaluate, so the
    training data does not depend on it); `max_train_examples` and `max_eval_examples` are applied after that.

    Args:
        script_args: `dataset_name`, the split names, streaming, the example caps and the carving seed.
        dataset_args: TRL's mixture configuration (`datasets`, `streaming`, `test_split_size`); None or one with no
            `datasets` when `dataset_name` gives the data.
        evaluate: whether the run evaluates (the script's `eval_strategy != "no"`): then an eval split is required.

    Raises:
        ValueError: no dataset given, a local path that does not exist or a file type that cannot be read, a
            missing split, a `test_split_size` that does not fit the data, or an empty split.
    """
    dataset_args = dataset_args if dataset_args is not None else DatasetMixtureConfig()
    test_size = _check_test_split_size(dataset_args.test_split_size)
    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning(
                f"Both `datasets` (a mixture) and `dataset_name` ({script_args.dataset_name!r}) are set: training on "
                "the mixture, as TRL's sft.py does; remove one of them to silence this warning."
            )
        splits = load_mixture(dataset_args)
        source, train_split, test_split = "the dataset mixture", "train", "test"
    elif script_args.dataset_name:
        splits = load_named(script_args)
        source = repr(script_args.dataset_name)
        train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    else:
        raise InputError(
            "No dataset given: set `dataset_name` (a local .jsonl/.json/.csv/.parquet file or folder, a Hub dataset "
            "id, or `bigbench:<task>`) or a mixture under `datasets:` in the recipe."
        )

    if train_split not in splits:
        raise InputError(
            f"{source} has no {train_split!r} split (its splits: {', '.join(splits) or 'none'}): set "
            "`dataset_train_split` to one of them, or name the training file train.jsonl (or .json, .csv, .parquet)."
        )
    train = splits[train_split]
    test = splits.get(test_split)
    if isinstance(train, Dataset) and len(train) == 0:
        raise InputError(f"The {train_split!r} split of {source} is empty (0 examples): give it training examples.")
    if test is None and test_size is not None:
        if isinstance(train, IterableDataset):
            raise InputError(
                f"test_split_size={dataset_args.test_split_size} cannot carve a held-out split out of a streamed "
                f"dataset ({source}): turn streaming off, or give the data a {test_split!r} split."
            )
        train, test = carve_test_split(train, test_size, seed=script_args.test_split_seed)
        logger.warning(
            f"{source} has no {test_split!r} split: held out {len(test)} of its {len(train) + len(test)} "
            f"{train_split!r} examples as the eval split (test_split_size={dataset_args.test_split_size}, "
            f"test_split_seed={script_args.test_split_seed}); training on the other {len(train)}."
        )
    elif test is not None and test_size is not None:
        logger.warning(
            f"{source} has a {test_split!r} split: it is the eval split, and test_split_size="
            f"{dataset_args.test_split_size} is not used."
        )
    if evaluate and test is None:
        others = [name for name in splits if name != train_split]
        hint = f"set `dataset_test_split` to one of {others}, or " if others else ""
        raise InputError(
            f"Evaluation is on (`eval_strategy`), but {source} has no {test_split!r} split: {hint}set "
            "`test_split_size` (e.g. 0.1, or 200 examples) to hold out part of the train split, or set "
            '`eval_strategy: "no"`.'
        )

    train = _capped(train, script_args.max_train_examples, "max_train_examples", "training")
    if not evaluate:
        return DataSplits(train, None)
    test = _capped(test, script_args.max_eval_examples, "max_eval_examples", "eval")
    if isinstance(test, Dataset) and len(test) == 0:
        raise InputError(
            f"The eval split of {source} is empty (0 examples; max_eval_examples={script_args.max_eval_examples}): "
            'give it examples, or set `eval_strategy: "no"`.'
        )
    return DataSplits(train, test)


def load_named(script_args: MinorSFTScriptArguments, where: str = "dataset_name"):
    """The splits of `dataset_name`: a `bigbench:` task, a local file or folder, or a `datasets.load_dataset` name.

    A single file is the train split (named `dataset_train_split`); a folder's splits come from its file names, as
    `datasets` reads them (`train.jsonl`, `test.jsonl`, `validation.jsonl`, ...; one file of any other name is
    `train`). `where` names the setting in errors.
    """
    name = script_args.dataset_name
    streaming = script_args.dataset_streaming
    if name.startswith(bigbench.SCHEME):
        return bigbench.load_splits(
            name.removeprefix(bigbench.SCHEME),
            test_size=script_args.bigbench_test_size,
            seed=script_args.test_split_seed,
        )
    path = Path(name).expanduser()
    if path.is_file():
        builder = file_builder(path, where)
        return _load_local(
            path, where, builder, data_files={script_args.dataset_train_split: str(path)}, streaming=streaming
        )
    if path.is_dir():
        if is_saved_dataset(path):
            saved = load_from_disk(str(path))
            return saved if isinstance(saved, DatasetDict) else DatasetDict({script_args.dataset_train_split: saved})
        check_folder(path, where)
        return _load_local(path, where, str(path), streaming=streaming)
    if looks_like_path(name):
        raise InputError(_missing_path(name, where))
    try:
        return load_dataset(name, name=script_args.dataset_config, streaming=streaming)
    except (FileNotFoundError, ConnectionError) as error:
        raise InputError(
            f"{where} {name!r} is neither a local file or folder (relative paths are read from "
            f"{os.getcwd()}) nor a dataset `datasets` could load from the Hub: {error}"
        ) from error


def load_mixture(dataset_args: DatasetMixtureConfig) -> DatasetDict:
    """TRL's `get_dataset` on the mixture, with its local files made readable, and without TRL's split.

    `datasets.load_dataset` does not read a path to a file (it is what fails with "Couldn't find any data file"), so
    a dataset whose `path` is a local file becomes the `json`/`csv`/`parquet` builder with that file as its
    `data_files`. `test_split_size` is left to `load_datasets`, which carves with a seed (TRL's split has none).
    """
    resolved = []
    for index, config in enumerate(dataset_args.datasets):
        where = f"datasets[{index}].path"
        if config.path.startswith(bigbench.SCHEME):
            raise InputError(
                f"{where} {config.path!r}: a `bigbench:` task cannot be part of a mixture; use it as `dataset_name`."
            )
        path = Path(config.path).expanduser()
        if path.is_file():
            builder = file_builder(path, where)
            check_utf8([path], where)
            check_file_records(path, where, config.columns)
            # The file is the split named before any slice (`train[:50%]`), which `load_dataset` then takes
            split_name = config.split.split("[")[0]
            config = replace(config, path=builder, name=None, data_dir=None, data_files={split_name: str(path)})
        elif path.is_dir():
            if is_saved_dataset(path):
                raise InputError(
                    f"{where} {config.path!r} was written by `save_to_disk`, which a mixture cannot read: export "
                    "it with `dataset.to_json('data.jsonl')` (or `.to_parquet`) and give that file."
                )
            check_folder(path, where)
        elif looks_like_path(config.path):
            raise InputError(_missing_path(config.path, where))
        resolved.append(config)
    try:
        with csv_read_as_text("datasets[].path"):
            return get_dataset(replace(dataset_args, datasets=resolved, test_split_size=None))
    except (ValueError, DatasetGenerationError) as error:
        if isinstance(error.__cause__, UnicodeDecodeError):
            raise InputError(
                f"A file of the mixture is not UTF-8 text ({error.__cause__}): save every file as UTF-8."
            ) from error
        if "can't be aligned" not in str(error):
            raise
        raise InputError(
            f"The datasets of the mixture cannot be joined: a column has different types in different datasets "
            f"({error}). Select the same columns in each (`columns:`), holding the same kind of values; files of "
            "one type join best."
        ) from error


def carve_test_split(dataset: Dataset, test_size: int | float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Disjoint `(train, test)` parts of `dataset`, shuffled with `seed`: the same for the same data and seed.

    Args:
        dataset: the train split to carve from.
        test_size: a fraction in (0, 1) (rounded up, as `datasets.train_test_split` does) or a number of examples.
        seed: the shuffle's seed.

    Raises:
        ValueError: if the held-out part would leave no training example.
    """
    total = len(dataset)
    count = math.ceil(test_size * total) if isinstance(test_size, float) else test_size
    if count >= total:
        raise InputError(
            f"test_split_size={test_size} holds out {count} examples, but the train split has only {total}: at least "
            "one must stay for training. Use a smaller count or a smaller fraction."
        )
    parts = dataset.train_test_split(test_size=count, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def _capped(dataset, cap: int | None, name: str, split: str):
    """`first(dataset, cap)`, saying when the cap leaves examples out."""
    capped = first(dataset, cap)
    if isinstance(dataset, Dataset) and len(capped) < len(dataset):
        logger.warning(f"{name}={cap}: using the first {len(capped)} of the {len(dataset)} {split} examples.")
    return capped


def first(dataset, n: int | None):
    """The first `n` examples (all if `n` is None), for a map-style or a streaming dataset."""
    if n is None:
        return dataset
    return dataset.take(n) if isinstance(dataset, IterableDataset) else dataset.select(range(min(n, len(dataset))))


def file_builder(path: Path, where: str) -> str:
    """The `datasets` builder that reads the local file `path`; `where` names the setting in errors."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InputError(
            f"{where} {str(path)!r}: cannot read {path.suffix or 'extension-less'} files; give a {_SUPPORTED} file "
            "(e.g. write your rows with `Dataset.from_list(rows).to_json('data.jsonl')`)."
        )
    if path.stat().st_size == 0:
        raise InputError(f"{where} {str(path)!r} is an empty file: write at least one example in it.")
    return builder


def data_files_in(path: Path) -> list[Path]:
    """The data files `datasets` reads in the folder `path` (of our file types, not hidden)."""
    return sorted(
        file
        for file in path.rglob("*")
        if file.is_file()
        and file.suffix.lower() in FILE_BUILDERS
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )


def check_folder(path: Path, where: str) -> None:
    """Refuse a folder with no data file `datasets` can read as one of our file types, or with an empty one (which
    `datasets` fails on with a bare `StopIteration`)."""
    files = data_files_in(path)
    if not files:
        raise InputError(
            f"{where} {str(path)!r} is a folder with no {_SUPPORTED} file: put the data in train.jsonl (and "
            "optionally test.jsonl) there, or give the file itself."
        )
    empty = [str(file) for file in files if file.stat().st_size == 0]
    if empty:
        raise InputError(f"{where} {str(path)!r} holds empty data files: {', '.join(empty)}; fill or remove them.")


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub id (`org/name`, or a bare `name`): it has a data
    file extension, starts like a path, or has more than one `/`."""
    return (
        Path(name).suffix.lower() in FILE_BUILDERS
        or name.startswith(("/", "./", "../", "~"))
        or name.strip("/").count("/") > 1
    )


def csv_text_features(files: list[Path], where: str) -> Features | None:
    """Every column of the CSV files as text, or `None` if they are not all CSV. `datasets` reads a CSV through
    pandas, which makes an answer that looks like a number a number (`" 74"` becomes `74`, which SFTTrainer cannot
    append its end-of-sequence token to) and text `large_string` (JSON and Parquet give `string`, so a mixture of
    both cannot be joined)."""
    if not files or any(file.suffix.lower() != ".csv" for file in files):
        return None
    try:
        with open(files[0], newline="", encoding="utf-8") as csv_file:
            header = next(csv.reader(csv_file), [])
    except UnicodeDecodeError as error:
        raise InputError(_not_utf8(files[0], where, error)) from error
    return Features({name: Value("string") for name in header})


@contextmanager
def csv_read_as_text(where: str) -> Iterator[None]:
    """Within the block, `datasets.load_dataset` of local CSV files (as TRL's `get_dataset` calls it for a mixture)
    reads every column as text (`csv_text_features`)."""
    original = datasets.load_dataset

    def load(path, *args, **kwargs):
        files = kwargs.get("data_files")
        if path == "csv" and isinstance(files, dict) and "features" not in kwargs:
            kwargs["features"] = csv_text_features([Path(file) for file in files.values()], where)
        return original(path, *args, **kwargs)

    with patch.object(datasets, "load_dataset", load):
        yield


def _load_local(path: Path, where: str, *args, **kwargs):
    """`load_dataset` on a local file or folder (CSV columns as text, see `csv_text_features`), naming the path when
    `datasets` cannot read it: a file that is not UTF-8, or without rows (a CSV with only its header is
    'Instruction "train" corresponds to no data!', a Parquet file with no rows a bare "An error occurred while
    generating the dataset")."""
    files = [path] if path.is_file() else data_files_in(path)
    check_utf8(files, where)
    for file in files:
        check_file_records(file, where)
    features = csv_text_features(files, where)
    if features is not None:
        kwargs.setdefault("features", features)
    try:
        return load_dataset(*args, **kwargs)
    except (ValueError, DatasetGenerationError) as error:
        if isinstance(error.__cause__, UnicodeDecodeError):
            raise InputError(_not_utf8(path, where, error.__cause__)) from error
        if isinstance(error, ValueError) and "corresponds to no data" not in str(error):
            raise
        cause = f": {error.__cause__}" if error.__cause__ is not None else ""
        raise InputError(
            f"{where} {str(path)!r}: `datasets` could not read it ({error}{cause}). A file may hold no rows (a "
            "CSV with only its header, an empty Parquet file) or malformed ones: give every file at least one valid "
            "example, or remove it."
        ) from error


def check_utf8(files: list[Path], where: str) -> None:
    """Refuse a text data file (JSON, JSON Lines, CSV) that is not UTF-8: `datasets` may read it without a word and
    fail on the first row that is read, with a bare `UnicodeDecodeError`."""
    for file in files:
        if file.suffix.lower() == ".parquet":
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    raise InputError(_not_utf8(file, where, error, offset)) from error
                offset += len(chunk)


def _not_utf8(path: Path, where: str, error: UnicodeDecodeError, offset: int = 0) -> str:
    """The message for a file that is not UTF-8; `offset`: where in the file the decoded bytes began."""
    return (
        f"{where} {str(path)!r} is not UTF-8 text (byte {error.object[error.start : error.start + 1]!r} at position "
        f"{offset + error.start} is not valid UTF-8; Latin-1 or Windows-1252 files are): save it as UTF-8, e.g. "
        f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`."
    )


def check_data_paths(script_args: MinorSFTScriptArguments, dataset_args: DatasetMixtureConfig | None) -> None:
    """Refuse a local data path that does not exist, from the arguments alone (before anything loads or launches)."""
    named = [("dataset_name", script_args.dataset_name)] if script_args.dataset_name else []
    mixture = dataset_args.datasets if dataset_args is not None and dataset_args.datasets else []
    named += [(f"datasets[{index}].path", config.path) for index, config in enumerate(mixture)]
    for where, name in named:
        if not name.startswith(bigbench.SCHEME) and looks_like_path(name) and not Path(name).expanduser().exists():
            raise InputError(_missing_path(name, where))


def _missing_path(name: str, where: str) -> str:
    return (
        f"{where} {name!r}: no such file or folder (relative paths are read from {os.getcwd()}). Give the path to "
        f"a {_SUPPORTED} file, a folder of them, or a Hub dataset id."
    )


def _check_test_split_size(value) -> int | float | None:
    """`test_split_size` as a fraction in (0, 1) or a count of at least 1. The command line parses it as a float
    (it is TRL's `float | None` field), so a whole number like 200.0 is a count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"test_split_size must be a fraction in (0, 1) or a number of examples, got {value!r}.")
    if isinstance(value, float) and value >= 1 and value.is_integer():
        value = int(value)
    if isinstance(value, float) and not 0 < value < 1 or isinstance(value, int) and value < 1:
        raise InputError(
            f"test_split_size={value} is neither a fraction in (0, 1) nor a number of examples of at least 1: use "
            "e.g. 0.1 (a tenth of the train split) or 200 (examples)."
        )
    return value
