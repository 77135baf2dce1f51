"""Google's BIG-bench tasks as datasets, read offline from the `bigbench` source package.

`bigbench:<task>` (e.g. `bigbench:unit_conversion/si_conversion`) names a task wherever a dataset name is expected.
The 358 MB source tarball is fetched once through the package index pip is configured to use (checked against its
sha256; it is never `pip install`ed), each task's `task.json` is read out of it into the cache, and the examples are
split with a fixed seed into disjoint train and test sets.
"""

import difflib
import json
import random
import tarfile
from pathlib import Path
from typing import Any

from ..cache import cache_root, cached_directory, file_sha256
from ..errors import InputError
from .package_index import download_from_index

SCHEME = "bigbench:"
PROJECT = "bigbench"
TARBALL_NAME = "bigbench-1.0.0.tar.gz"
TARBALL_SIZE = "358 MB"
TARBALL_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def tarball() -> Path:
    """The BIG-bench source tarball, downloaded through pip's package index into the cache on first use."""
    entry = cached_directory(
        cache_root() / "bigbench" / "source", {"sha256": TARBALL_SHA256}, lambda out: _download(out / TARBALL_NAME)
    )
    return entry / TARBALL_NAME


def _download(path: Path) -> None:
    download_from_index(PROJECT, TARBALL_NAME, TARBALL_SHA256, path, size=TARBALL_SIZE)


def load_task(task: str, archive: Path | None = None) -> dict[str, Any]:
    """The `task.json` of a BIG-bench JSON task, e.g. `"unit_conversion/si_conversion"`, read from `archive` (the
    `bigbench` source tarball by default) once and cached."""
    archive_sha256 = TARBALL_SHA256 if archive is None else file_sha256(archive)
    key = {"tarball_sha256": archive_sha256, "task": task}
    entry_name = f"{task.replace('/', '__')}-{archive_sha256[:12]}"
    entry = cached_directory(cache_root() / "bigbench" / "tasks" / entry_name, key, _extractor(task, archive))
    return json.loads((entry / "task.json").read_text())


def _extractor(task: str, archive_path: Path | None):
    def extract(out: Path) -> None:
        member_name = f"{TASKS_PREFIX}{task}/task.json"
        available = []
        with tarfile.open(archive_path or tarball()) as archive:
            for member in archive:
                if member.name == member_name:
                    (out / "task.json").write_bytes(archive.extractfile(member).read())
                    return
                if member.name.startswith(TASKS_PREFIX) and member.name.endswith("/task.json"):
                    available.append(member.name.removeprefix(TASKS_PREFIX).removesuffix("/task.json"))
        close = difflib.get_close_matches(task, available, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise InputError(
            f"BIG-bench has no JSON task {task!r} (programmatic tasks are not supported).{hint} "
            f"Tasks are named by their folder under bigbench/benchmark_tasks, e.g. 'unit_conversion/si_conversion'."
        )

    return extract


def task_examples(task: str, archive: Path | None = None) -> list[dict[str, Any]]:
    """The task's examples as prompt-completion pairs, with what scoring them needs.

    A multiple-choice task (examples with `target_scores`) gives `prompt` (the question, trailing spaces stripped),
    `completion` (the correct choice, after one space), `choices` (every choice, same form) and `answer` (index of the
    correct choice). An exact-match task (examples with `target` only) gives `prompt`, `completion` (the first
    target, after one space) and `targets` (every accepted answer).
    """
    data = load_task(task, archive)
    multiple_choice = any(example.get("target_scores") for example in data["examples"])
    examples = []
    for example in data["examples"]:
        prompt = example["input"].rstrip()
        if multiple_choice:
            scores = example.get("target_scores")
            if not scores:
                continue
            choices = [" " + choice.strip() for choice in scores]
            if data.get("append_choices_to_input", True) not in (False, "false"):
                prompt += "".join(f"\n choice: {choice.strip()}" for choice in scores) + "\nAnswer:"
            answer = max(range(len(choices)), key=lambda i: list(scores.values())[i])
            examples.append({"prompt": prompt, "completion": choices[answer], "choices": choices, "answer": answer})
        elif example.get("target"):
            targets = [example["target"]] if isinstance(example["target"], str) else list(example["target"])
            examples.append({"prompt": prompt, "completion": " " + targets[0].strip(), "targets": targets})
    if not examples:
        raise InputError(f"BIG-bench task {task!r} has neither multiple-choice nor exact-match examples.")
    return examples


def task_texts(task: str, archive: Path | None = None) -> list[str]:
    """The raw `input` texts of a task, e.g. the news articles of `gem/xsum`, as held-out natural text."""
    return [example["input"] for example in load_task(task, archive)["examples"] if example.get("input")]


def load_splits(task: str, test_size: int, seed: int = 0, archive: Path | None = None):
    """A `DatasetDict` with disjoint `train` and `test` splits of the task, shuffled with `seed`.

    `test` holds `test_size` examples; `train` holds the rest, in shuffled order (take its first N for a smaller
    training set: the test split does not change).
    """
    from datasets import Dataset, DatasetDict

    examples = task_examples(task, archive)
    if not 0 < test_size < len(examples):
        raise InputError(
            f"test_size must be between 1 and {len(examples) - 1} for BIG-bench task {task!r} "
            f"({len(examples)} examples), got {test_size}."
        )
    random.Random(seed).shuffle(examples)
    return DatasetDict(
        test=Dataset.from_list(examples[:test_size]),
        train=Dataset.from_list(examples[test_size:]),
    )
