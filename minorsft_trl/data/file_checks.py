"""Local data files checked record by record before `datasets` reads them, so that a mistake is named by the line
of the file it is on (after `datasets` has read and the script has shuffled and split the data, a row number points
nowhere the user can look).

`datasets` reads a JSON value it cannot store as text silently: `NaN` becomes a missing value and `Infinity` a value
TRL then fails on with `AttributeError: 'int' object has no attribute 'endswith'`. Each record of a JSON Lines, JSON
or CSV file must hold what the format of its first record needs (the formats TRL reads, see `dataset_checks`): text
where text is read, a list of turns where a conversation is.
"""

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

# Other records with a problem named in an error, at most
_SHOWN = 5
# The columns each format needs, and the kind of value each holds: "text" (a string), "turns" (a list of dicts),
# "text or turns" (prompt-completion, plain or conversational), "ids" (a list of token ids)
FORMATS = {
    "language modelling": {"text": "text"},
    "conversational": {"messages": "turns"},
    "conversational (ShareGPT)": {"conversations": "turns"},
    "prompt-completion": {"prompt": "text or turns", "completion": "text or turns"},
    "tokenised": {"input_ids": "ids"},
}


def check_file_records(path: Path, where: str, columns: list[str] | None = None) -> None:
    """Raise, naming the line (or JSON element, or CSV line) and the fix, at the first record of `path` that misses a
    value its format needs or holds one of the wrong kind (and the other records with a problem). Only `columns` are
    read, if given (a mixture's `columns:`). Files whose first record has no format TRL reads are left to the dataset
    checks, which list the columns."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return
    records = _csv_records(path) if suffix == ".csv" else _json_records(path, where)
    if columns is not None:
        records = ((location, {k: v for k, v in record.items() if k in columns}) for location, record in records)
    first = next(records, None)
    if first is None:
        return
    location, record = first
    needed = _format_of(record)
    if needed is None:
        return
    problems = []
    for location, record in [first, *records]:
        problems += [(location, p) for column, kind in needed.items() if (p := _problem(record, column, kind))]
    if problems:
        (location, problem), others = problems[0], [location for location, _ in problems[1:]]
        also = f" (and {', '.join(others[:_SHOWN])}{', ...' if len(others) > _SHOWN else ''})" if others else ""
        raise InputError(f"{where} {str(path)!r}, {location}{also}: {problem}")


def _format_of(record: dict) -> dict[str, str] | None:
    """The columns and kinds of the first format whose columns the record has (TRL picks it from the first row)."""
    return next((needed for needed in FORMATS.values() if set(needed) <= set(record)), None)


def _problem(record: dict, column: str, kind: str) -> str | None:
    """What is wrong with `record[column]` for a value of `kind`, as the rest of a sentence, or `None`."""
    if column not in record or record[column] is None:
        shown = "no" if column not in record else "a null"
        return (
            f"the record has {shown} `{column}`, which every record of this file needs (its first record has it). "
            "Fill it in, or remove the record."
        )
    value = record[column]
    if isinstance(value, float) and not math.isfinite(value):
        return (
            f"`{column}` is {json.dumps(value)}, a number JSON writes without quotes, not text. Quote it "
            f'(`"{column}": "{json.dumps(value)}"`) if it is the text, or remove the record.'
        )
    text_ok = isinstance(value, str)
    turns_ok = isinstance(value, list) and all(isinstance(turn, dict) for turn in value)
    ids_ok = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    ok = {"text": text_ok, "turns": turns_ok, "text or turns": text_ok or turns_ok, "ids": ids_ok}[kind]
    if ok:
        return None
    wanted = {
        "text": "text (a string)",
        "turns": "a list of turns",
        "text or turns": "text (a string) or a list of turns",
        "ids": "a list of token ids",
    }[kind]
    return f"`{column}` is {json.dumps(value)[:60]} ({type(value).__name__}), not {wanted}. Quote or fix it."


def _json_records(path: Path, where: str) -> Iterator[tuple[str, dict]]:
    """`("line N", record)` of a JSON Lines file (blank lines skipped), or `("element N", record)` of a JSON file
    holding a list of records; a JSON file of another shape yields nothing (`datasets` reads or refuses it)."""
    with open(path, encoding="utf-8") as stream:
        if path.suffix.lower() == ".json":
            starts_as_list = stream.read(4096).lstrip().startswith("[")
            stream.seek(0)
            if not starts_as_list:
                yield from _json_lines(stream, path, where)
                return
            records = _parse(stream.read(), path, where, "the file")
            for index, record in enumerate(records if isinstance(records, list) else []):
                if isinstance(record, dict):
                    yield f"element {index}", record
            return
        yield from _json_lines(stream, path, where)


def _json_lines(stream, path: Path, where: str) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            record = _parse(line, path, where, f"line {number}")
            if not isinstance(record, dict):
                raise InputError(
                    f"{where} {str(path)!r}, line {number}: a record must be a JSON object "
                    f'(`{{"prompt": ..., "completion": ...}}`), not {type(record).__name__}.'
                )
            yield f"line {number}", record


def _parse(text: str, path: Path, where: str, location: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where} {str(path)!r}, {location}: not valid JSON ({error}). Fix or remove it.") from error


def _csv_records(path: Path) -> Iterator[tuple[str, dict]]:
    """`("line N", record)` of a CSV file with a header, N the line the record starts on; an empty field is a missing
    value, as `datasets` reads it."""
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for row in reader:
            values = {name: (value if value != "" else None) for name, value in zip(header, row, strict=False)}
            yield f"line {start}", values
            start = reader.line_num + 1
