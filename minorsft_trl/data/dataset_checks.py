"""Datasets checked before anything is tokenised: a format `SFTTrainer` can read, in every row, and no example that
would silently train on nothing.

TRL reads a dataset in one of five formats, chosen from its first row: language modelling (a `text` column, or
`dataset_text_field`), conversations (`messages`, or ShareGPT's `conversations` of `from`/`value` turns, which TRL
converts to `messages` with `maybe_convert_to_chatml`), prompt-completion (`prompt` and `completion`, plain or
conversational), or tokenised (`input_ids`). A dataset it cannot read fails deep inside tokenisation (`KeyError:
'text'`), and a row of another format than the first, or a missing value, fails or is silently mangled there.
"""

import pyarrow.compute as pc
import transformers
from datasets import Dataset
from trl.data_utils import is_conversational_from_value

from ..errors import InputError

logger = transformers.utils.logging.get_logger(__name__)

# Rows named in an error, at most
_SHOWN = 5


def dataset_formats(text_field: str) -> dict[str, tuple[str, ...]]:
    """The formats SFTTrainer reads, by the columns each needs."""
    return {
        "language modelling": (text_field,),
        "conversational": ("messages",),
        "conversational (ShareGPT)": ("conversations",),
        "prompt-completion": ("prompt", "completion"),
        "tokenised": ("input_ids",),
    }


def check_dataset(dataset, name: str, text_field: str) -> None:
    """Raise if `dataset` has no format SFTTrainer reads, mixes formats across rows, or misses a value a row needs;
    warn about empty completions. Map-style datasets are checked in every row, streaming ones in their first."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for split, part in dataset.items():
            check_dataset(part, f"{name}[{split!r}]", text_field)
        return
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise InputError(f"`{name}` is empty (0 examples): pass a dataset with at least one example.")
    first_row = next(iter(dataset), {})
    columns = dataset.column_names if dataset.column_names is not None else list(first_row)
    formats = {fmt: needed for fmt, needed in dataset_formats(text_field).items() if set(needed) <= set(columns)}
    if "conversations" in columns and not is_conversational_from_value(first_row):
        # TRL converts `conversations` only when its turns are `from`/`value` dicts, and reads nothing else of it
        formats.pop("conversational (ShareGPT)")
    if not formats:
        raise InputError(
            f"`{name}` has the columns {sorted(columns)}, and SFTTrainer reads a `{text_field}` column (language "
            "modelling), `messages` (conversations of `role`/`content` turns), `conversations` (ShareGPT: turns of "
            "`from`/`value`), `prompt` and `completion` (prompt-completion) or `input_ids` (tokenised). Rename the "
            "columns (`dataset.rename_column(old, new)`), set `dataset_text_field`, or pass a `formatting_func`."
        )
    if not isinstance(dataset, Dataset):
        return
    needed = sorted({column for columns in formats.values() for column in columns})
    table = dataset.select_columns(needed).with_format("arrow")[:]
    present = {fmt: _present_rows(table, columns) for fmt, columns in formats.items()}
    complete = [fmt for fmt, rows in present.items() if pc.all(rows).as_py()]
    if not complete:
        _raise_incomplete(name, table, present, formats)
    if "prompt-completion" in complete:
        _warn_empty_completions(name, table)


def _present_rows(table, columns: tuple[str, ...]):
    """A boolean array: whether each row has a value in every one of `columns`."""
    present = pc.is_valid(table.column(columns[0]))
    for column in columns[1:]:
        present = pc.and_(present, pc.is_valid(table.column(column)))
    return present


def _raise_incomplete(name: str, table, present: dict, formats: dict) -> None:
    """No format has its values in every row: rows of several formats, or missing values."""
    described = []
    for fmt, rows in present.items():
        missing = pc.indices_nonzero(pc.invert(rows)).to_pylist()
        described.append(f"{fmt} ({', '.join(formats[fmt])}) is missing in rows {missing[:_SHOWN]}")
    mixed = sum(pc.any(rows).as_py() for rows in present.values()) > 1
    raise InputError(
        f"`{name}` has rows of {'several formats' if mixed else 'missing values'}: "
        + "; ".join(described)
        + (
            ". Every row must be of one format: convert them to one (e.g. `prompt`/`completion`), or split the data."
            if mixed
            else ". Fill those values or drop the rows (`dataset.filter(lambda row: row[column] is not None)`)."
        )
    )


def _warn_empty_completions(name: str, table) -> None:
    completion = table.column("completion")
    if not (completion.type == "string" or str(completion.type) == "large_string"):
        return
    empty = pc.indices_nonzero(pc.equal(pc.utf8_length(completion), 0)).to_pylist()
    if empty:
        logger.warning(
            f"{len(empty)} examples of `{name}` have an empty completion (rows {empty[:_SHOWN]}): they train on the "
            "end-of-sequence token alone. Drop them if that is not what you mean."
        )
