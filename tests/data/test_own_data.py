"""Training on one's own data: local files and folders, a held-out split carved when there is none, TRL's dataset
mixtures, `bigbench:` names, and an error that names the value and the fix for each way it can go wrong."""

import csv
import io
import json
import logging
import tarfile

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from tiny import cpu_args
from trl import DatasetMixtureConfig, ModelConfig, TrlParser
from trl.scripts.utils import DatasetConfig

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer
from minorsft_trl.data import bigbench
from minorsft_trl.data import sources as data
from minorsft_trl.data.sources import MinorSFTScriptArguments, carve_test_split, load_datasets

EXTENSIONS = ["jsonl", "json", "csv", "parquet"]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Keep the datasets' Arrow caches and the BIG-bench cache out of the user's home, and the Hub unreachable."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MINORSFT_TRL_CACHE", str(tmp_path / "cache"))


def rows(n: int, start: int = 0, **extra) -> list[dict]:
    """`n` distinct prompt-completion rows, numbered from `start`, with constant `extra` columns."""
    return [{"prompt": f"question {i}?", "completion": f" answer {i}", **extra} for i in range(start, start + n)]


def write(path, records: list[dict]):
    """Write `records` as `path`'s extension says: JSON lines, a JSON array, CSV with a header, or Parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("\n".join(map(str, records)))
    return path


def script_args(dataset_name=None, **overrides) -> MinorSFTScriptArguments:
    return MinorSFTScriptArguments(dataset_name=None if dataset_name is None else str(dataset_name), **overrides)


def as_list(dataset) -> list[dict]:
    return [dict(row) for row in dataset]


@pytest.mark.parametrize("extension", EXTENSIONS)
def test_a_single_file_is_the_train_split(tmp_path, extension):
    path = write(tmp_path / f"data.{extension}", rows(5))
    train, eval_dataset = load_datasets(script_args(path), evaluate=False)
    assert as_list(train) == rows(5) and eval_dataset is None
    # Whatever the train split is called in the recipe
    train, _ = load_datasets(script_args(path, dataset_train_split="train_sft"), evaluate=False)
    assert as_list(train) == rows(5)


@pytest.mark.parametrize("extension", EXTENSIONS)
def test_a_folder_gives_its_train_and_test_files(tmp_path, extension):
    write(tmp_path / "data" / f"train.{extension}", rows(6))
    write(tmp_path / "data" / f"test.{extension}", rows(3, start=100))
    train, eval_dataset = load_datasets(script_args(tmp_path / "data"), evaluate=True)
    assert as_list(train) == rows(6) and as_list(eval_dataset) == rows(3, start=100)


@pytest.mark.parametrize("extension", EXTENSIONS)
def test_a_folder_with_one_file_of_any_name_is_the_train_split(tmp_path, extension):
    write(tmp_path / "data" / f"my_rows.{extension}", rows(4))
    train, _ = load_datasets(script_args(tmp_path / "data"), evaluate=False)
    assert as_list(train) == rows(4)


@pytest.mark.parametrize(
    "test_split_size, held_out",
    [(0.25, 3), (4, 4), (4.0, 4)],  # ceil(0.25 * 10); a count; a count as the command line parses it (a float)
    ids=["fraction", "count", "count from the command line"],
)
def test_test_split_size_carves_disjoint_deterministic_splits(tmp_path, caplog, test_split_size, held_out):
    write(tmp_path / "data" / "train.jsonl", rows(10))
    args = script_args(tmp_path / "data")
    mixture = DatasetMixtureConfig(test_split_size=test_split_size)
    with caplog.at_level(logging.WARNING, logger="minorsft_trl.data.sources"):
        train, eval_dataset = load_datasets(args, mixture, evaluate=True)
    assert (len(train), len(eval_dataset)) == (10 - held_out, held_out)
    prompts, held_out_prompts = set(train["prompt"]), set(eval_dataset["prompt"])
    assert not prompts & held_out_prompts and prompts | held_out_prompts == {row["prompt"] for row in rows(10)}
    assert f"held out {held_out} of its 10 'train' examples" in caplog.text

    again = load_datasets(args, mixture, evaluate=True)
    assert again.eval["prompt"] == eval_dataset["prompt"] and again.train["prompt"] == train["prompt"]
    # Shuffled: not simply the last (or first) rows, and another seed holds out other examples
    assert sorted(held_out_prompts) != sorted(row["prompt"] for row in rows(10)[-held_out:])
    other = load_datasets(script_args(tmp_path / "data", test_split_seed=1), mixture, evaluate=True)
    assert set(other.eval["prompt"]) != held_out_prompts


def test_the_carved_split_does_not_depend_on_evaluation_and_caps_apply_after_it(tmp_path):
    write(tmp_path / "data.jsonl", rows(10))
    mixture = DatasetMixtureConfig(test_split_size=0.3)
    evaluated = load_datasets(script_args(tmp_path / "data.jsonl"), mixture, evaluate=True)
    not_evaluated = load_datasets(script_args(tmp_path / "data.jsonl"), mixture, evaluate=False)
    assert not_evaluated.eval is None and not_evaluated.train["prompt"] == evaluated.train["prompt"]

    capped = load_datasets(
        script_args(tmp_path / "data.jsonl", max_train_examples=2, max_eval_examples=1), mixture, evaluate=True
    )
    assert capped.train["prompt"] == evaluated.train["prompt"][:2]
    assert capped.eval["prompt"] == evaluated.eval["prompt"][:1]


def test_an_existing_test_split_wins_over_test_split_size(tmp_path, caplog):
    write(tmp_path / "data" / "train.jsonl", rows(6))
    write(tmp_path / "data" / "test.jsonl", rows(2, start=50))
    with caplog.at_level(logging.WARNING, logger="minorsft_trl.data.sources"):
        train, eval_dataset = load_datasets(
            script_args(tmp_path / "data"), DatasetMixtureConfig(test_split_size=0.5), evaluate=True
        )
    assert as_list(train) == rows(6) and as_list(eval_dataset) == rows(2, start=50)
    assert "test_split_size=0.5 is not used" in caplog.text


def test_a_validation_split_can_be_the_eval_split(tmp_path):
    write(tmp_path / "data" / "train.jsonl", rows(6))
    write(tmp_path / "data" / "validation.jsonl", rows(2, start=50))
    with pytest.raises(ValueError, match=r"no 'test' split: set `dataset_test_split` to one of \['validation'\]"):
        load_datasets(script_args(tmp_path / "data"), evaluate=True)
    _, eval_dataset = load_datasets(script_args(tmp_path / "data", dataset_test_split="validation"), evaluate=True)
    assert as_list(eval_dataset) == rows(2, start=50)


def test_a_folder_written_by_save_to_disk(tmp_path):
    DatasetDict(train=Dataset.from_list(rows(4)), test=Dataset.from_list(rows(2, start=9))).save_to_disk(
        tmp_path / "saved"
    )
    train, eval_dataset = load_datasets(script_args(tmp_path / "saved"), evaluate=True)
    assert as_list(train) == rows(4) and as_list(eval_dataset) == rows(2, start=9)


def test_a_mixture_of_two_local_files_with_columns_and_fractions(tmp_path):
    first = write(tmp_path / "first.jsonl", rows(10, source="first"))
    second = write(tmp_path / "second.parquet", rows(6, start=100, license="cc-by"))
    columns = ["prompt", "completion"]  # the files' other columns differ: without a selection they cannot be joined

    def mixture(first_fraction, second_fraction, **kwargs):
        return DatasetMixtureConfig(
            datasets=[
                DatasetConfig(path=str(first), columns=columns, fraction=first_fraction),
                DatasetConfig(path=str(second), columns=columns, fraction=second_fraction),
            ],
            **kwargs,
        )

    # Equal shares, capped by the smaller file: its 6 rows and the first 6 of the other
    train, eval_dataset = load_datasets(script_args(), mixture(0.5, 0.5), evaluate=False)
    assert eval_dataset is None and train.column_names == columns
    assert as_list(train) == [{k: row[k] for k in columns} for row in rows(6)] + rows(6, start=100)
    # 3:1, capped by the larger file: all its 10 rows and round(10 / 3) = 3 of the other
    train, _ = load_datasets(script_args(), mixture(0.75, 0.25), evaluate=False)
    assert train["prompt"] == [row["prompt"] for row in rows(10) + rows(3, start=100)]

    # A mixture has only a train split: the held-out split is carved from the mixture
    train, eval_dataset = load_datasets(script_args(), mixture(0.5, 0.5, test_split_size=4), evaluate=True)
    assert (len(train), len(eval_dataset)) == (8, 4)
    assert not set(train["prompt"]) & set(eval_dataset["prompt"])
    with pytest.raises(ValueError, match=r"has no 'test' split: set `test_split_size`"):
        load_datasets(script_args(), mixture(0.5, 0.5), evaluate=True)


@pytest.mark.parametrize(("split", "expected"), [("train[:50%]", rows(5)), ("train[2:4]", rows(4)[2:])])
def test_a_mixture_entry_that_is_a_local_file_takes_a_sliced_split(tmp_path, split, expected):
    """As for a Hub dataset through TRL: the slice is read from the file's one split."""
    data = write(tmp_path / "data.jsonl", rows(10))
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path=str(data), split=split)])
    train, _ = load_datasets(script_args(), mixture, evaluate=False)
    assert as_list(train) == expected


def test_a_recipe_with_a_mixture_parses_with_the_scripts_dataclasses(tmp_path):
    """The four dataclasses of TRL's sft.py, with ours in place of `ScriptArguments` and `SFTConfig`: no field
    clashes, and the YAML a user writes gives a mixture `load_datasets` reads."""
    first = write(tmp_path / "first.jsonl", rows(8, source="a"))
    second = write(tmp_path / "second.jsonl", rows(8, start=100, origin="b"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: some/model\noutput_dir: {tmp_path / 'out'}\nuse_cpu: true\neval_strategy: steps\n"
        f"datasets:\n"
        f"  - path: {first}\n    columns: [prompt, completion]\n"
        f"  - path: {second}\n    columns: [prompt, completion]\n"
        f"test_split_size: 0.25\n"
    )
    parser = TrlParser((MinorSFTScriptArguments, MinorSFTConfig, ModelConfig, DatasetMixtureConfig))
    script, training, _, mixture = parser.parse_args_and_config(["--config", str(recipe), "--test_split_seed", "3"])
    assert mixture.datasets[1] == DatasetConfig(path=str(second), columns=["prompt", "completion"])
    train, eval_dataset = load_datasets(script, mixture, evaluate=training.eval_strategy != "no")
    assert (len(train), len(eval_dataset)) == (12, 4) and script.test_split_seed == 3

    # A count on the command line arrives as a float: still a count
    *_, mixture = parser.parse_args_and_config(["--config", str(recipe), "--test_split_size", "5"])
    assert len(load_datasets(script, mixture, evaluate=True).eval) == 5


def fake_bigbench_tarball(tmp_path):
    """A tarball laid out like the bigbench source package, with one 10-example multiple-choice task."""
    task = {
        "examples": [{"input": f"{i} m in cm is", "target_scores": {f"{i}00 cm": 1, f"{i} cm": 0}} for i in range(10)]
    }
    payload = json.dumps(task).encode()
    path = tmp_path / "bigbench-fake.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"{bigbench.TASKS_PREFIX}units/metres/task.json")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return path


def test_bigbench_names_still_give_their_seeded_splits(tmp_path, monkeypatch):
    archive = fake_bigbench_tarball(tmp_path)
    monkeypatch.setattr(bigbench, "tarball", lambda: archive)  # no download
    args = script_args("bigbench:units/metres", bigbench_test_size=4)
    train, eval_dataset = load_datasets(args, evaluate=True)
    expected = bigbench.load_splits("units/metres", test_size=4, archive=archive)
    assert train["prompt"] == expected["train"]["prompt"] and eval_dataset["prompt"] == expected["test"]["prompt"]
    assert (len(train), len(eval_dataset)) == (6, 4)


def test_carve_test_split_alone(tmp_path):
    train, test = carve_test_split(Dataset.from_list(rows(5)), 0.5, seed=0)
    assert (len(train), len(test)) == (2, 3)  # rounded up, as datasets does
    assert sorted(list(train["prompt"]) + list(test["prompt"])) == sorted(row["prompt"] for row in rows(5))


def make_error_cases(tmp_path):
    """(script arguments, mixture, evaluate, expected message) for each way of getting the data wrong."""
    write(tmp_path / "ten" / "train.jsonl", rows(10))
    write(tmp_path / "only_test" / "test.jsonl", rows(3))
    write(tmp_path / "notes.txt", ["not", "data"])
    write(tmp_path / "texts" / "notes.txt", ["not", "data"])
    (tmp_path / "empty.jsonl").write_text("")
    write(tmp_path / "header_only.csv", [{"prompt": "p", "completion": "c"}]).write_text("prompt,completion\n")
    write(tmp_path / "empty_test" / "train.jsonl", rows(3))
    (tmp_path / "empty_test" / "test.jsonl").write_text("")
    write(tmp_path / "no_test_rows" / "train.parquet", rows(3))
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "no_test_rows" / "test.parquet")
    ten = tmp_path / "ten"
    missing_mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path=str(tmp_path / "nowhere" / "x.jsonl"))])
    # Valid alone (conversational prompt-completion), but not joinable with the plain text of the other file
    write(
        tmp_path / "numbers.jsonl",
        [{"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}],
    )
    clashing_mixture = DatasetMixtureConfig(
        datasets=[DatasetConfig(path=str(ten / "train.jsonl")), DatasetConfig(path=str(tmp_path / "numbers.jsonl"))]
    )
    return {
        "no dataset": (script_args(), None, False, r"No dataset given: set `dataset_name`"),
        "missing file": (
            script_args(tmp_path / "missing.jsonl"),
            None,
            False,
            r"dataset_name '.*missing\.jsonl': no such file or folder",
        ),
        "missing relative file": (script_args("data/missing.jsonl"), None, False, r"no such file or folder"),
        "missing file in a mixture": (script_args(), missing_mixture, False, r"datasets\[0\]\.path .*no such file"),
        "mixture of clashing column types": (
            script_args(),
            clashing_mixture,
            False,
            r"datasets of the mixture cannot be joined: a column has different types",
        ),
        "unknown hub id offline": (
            script_args("someone/not-a-dataset"),
            None,
            False,
            r"'someone/not-a-dataset' is neither a local file or folder .* nor a dataset",
        ),
        "unreadable file type": (
            script_args(tmp_path / "notes.txt"),
            None,
            False,
            r"cannot read \.txt files; give a \.jsonl, \.json, \.csv, \.parquet file",
        ),
        "folder without data files": (
            script_args(tmp_path / "texts"),
            None,
            False,
            r"folder with no \.jsonl, \.json, \.csv, \.parquet file",
        ),
        "empty file": (script_args(tmp_path / "empty.jsonl"), None, False, r"is an empty file"),
        "header-only csv": (
            script_args(tmp_path / "header_only.csv"),
            None,
            False,
            r"could not read it .*a CSV with only its header",
        ),
        "no train split": (
            script_args(tmp_path / "only_test"),
            None,
            False,
            r"has no 'train' split \(its splits: test",
        ),
        "eval without test split": (
            script_args(ten),
            None,
            True,
            r"Evaluation is on .* has no 'test' split: set `test_split_size`",
        ),
        "test_split_size as large as the data": (
            script_args(ten),
            DatasetMixtureConfig(test_split_size=10),
            True,
            r"test_split_size=10 holds out 10 examples, but the train split has only 10",
        ),
        "fraction leaving nothing to train on": (
            script_args(ten),
            DatasetMixtureConfig(test_split_size=0.99),
            False,
            r"test_split_size=0.99 holds out 10 examples",
        ),
        "fraction above one": (
            script_args(ten),
            DatasetMixtureConfig(test_split_size=1.5),
            True,
            r"test_split_size=1.5 is neither a fraction in \(0, 1\) nor a number of examples",
        ),
        "zero test_split_size": (
            script_args(ten),
            DatasetMixtureConfig(test_split_size=0),
            True,
            r"neither a fraction",
        ),
        "streamed data to carve": (
            script_args(ten, dataset_streaming=True),
            DatasetMixtureConfig(test_split_size=2),
            True,
            r"cannot carve a held-out split out of a streamed dataset",
        ),
        "empty test file": (
            script_args(tmp_path / "empty_test"),
            None,
            True,
            r"'.*empty_test' holds empty data files: .*test\.jsonl",
        ),
        "parquet test file without rows": (
            script_args(tmp_path / "no_test_rows"),
            None,
            True,
            r"'.*no_test_rows': `datasets` could not read it .*an empty Parquet file",
        ),
        "empty eval split after max_eval_examples": (
            script_args(ten, max_eval_examples=0),
            DatasetMixtureConfig(test_split_size=2),
            True,
            r"is empty \(0 examples; max_eval_examples=0\)",
        ),
    }


ERROR_CASES = [
    "no dataset",
    "missing file",
    "missing relative file",
    "missing file in a mixture",
    "mixture of clashing column types",
    "unknown hub id offline",
    "unreadable file type",
    "folder without data files",
    "empty file",
    "header-only csv",
    "no train split",
    "eval without test split",
    "test_split_size as large as the data",
    "fraction leaving nothing to train on",
    "fraction above one",
    "zero test_split_size",
    "streamed data to carve",
    "empty test file",
    "parquet test file without rows",
    "empty eval split after max_eval_examples",
]


def test_an_empty_eval_split_is_an_error(tmp_path, monkeypatch):
    """As a Hub dataset's empty split would be: a split that loads, with no rows."""
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    monkeypatch.setattr(data, "load_named", lambda args: DatasetDict(train=Dataset.from_list(rows(3)), test=empty))
    with pytest.raises(
        ValueError, match=r"The eval split of 'org/data' is empty \(0 examples; max_eval_examples=None"
    ):
        load_datasets(script_args("org/data"), evaluate=True)
    assert load_datasets(script_args("org/data"), evaluate=False).eval is None  # not evaluating: no eval split needed


@pytest.mark.parametrize("case", ERROR_CASES)
def test_each_mistake_is_a_clear_error(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # relative paths are read from here
    cases = make_error_cases(tmp_path)
    assert sorted(cases) == sorted(ERROR_CASES)
    args, mixture, evaluate, message = cases[case]
    with pytest.raises(ValueError, match=message):
        load_datasets(args, mixture, evaluate=evaluate)


def test_a_csv_whose_answers_look_like_numbers_trains_on_them_as_text(tmp_path, tokenizer, tiny_model_dir):
    """pandas reads `" 74"` as the number 74, which SFTTrainer cannot append its end-of-sequence token to."""
    data = write(tmp_path / "numbers.csv", [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)])
    train, _ = load_datasets(script_args(data), evaluate=False)
    assert train[0] == {"prompt": "0 + 0 =", "completion": " 0"}
    trainer = MinorSFTTrainer(
        tiny_model_dir, args=cpu_args(tmp_path / "out", max_steps=1), train_dataset=train, processing_class=tokenizer
    )
    trainer.train()


def test_a_mixture_of_a_csv_and_a_jsonl_file_joins_their_text_columns(tmp_path):
    csv_file = write(
        tmp_path / "a.csv", [{"prompt": "1 + 1 =", "completion": " 2"}, {"prompt": "x", "completion": "7"}]
    )
    jsonl_file = write(tmp_path / "b.jsonl", rows(2))
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path=str(csv_file)), DatasetConfig(path=str(jsonl_file))])
    train, _ = load_datasets(script_args(), mixture, evaluate=False)
    assert train["completion"][:2] == [" 2", "7"] and len(train) == 4
