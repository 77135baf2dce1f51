"""Local data files are checked record by record before `datasets` reads them: a mistake is named by the line of the
file it is on, with the fix, before any model loads."""

import json

import pytest

from minorsft_trl.data.file_checks import check_file_records
from minorsft_trl.data.sources import MinorSFTScriptArguments, load_named

GOOD = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(20)]


def jsonl(tmp_path, lines: list[str], name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def good_lines() -> list[str]:
    return [json.dumps(record) for record in GOOD]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "q3"}', r"line 4: the record has no `completion`"),
        ('{"prompt": "q3", "completion": null}', r"line 4: the record has a null `completion`"),
        ('{"prompt": "q3", "completion": NaN}', r'line 4: `completion` is NaN, .* Quote it \(`"completion": "NaN"`\)'),
        ('{"prompt": "q3", "completion": Infinity}', r"line 4: `completion` is Infinity"),
        ('{"prompt": "q3", "completion": 74}', r"line 4: `completion` is 74 \(int\), not text \(a string\) or a list"),
        ('{"prompt": "q3", "completion": " a3"', r"line 4: not valid JSON"),
        ('["q3", " a3"]', r"line 4: a record must be a JSON object"),
    ],
)
def test_a_bad_record_is_named_by_its_line(tmp_path, line, message):
    lines = good_lines()
    lines[3] = line
    with pytest.raises(ValueError, match=message):
        check_file_records(jsonl(tmp_path, lines), "dataset_name")


def test_every_bad_line_is_named_and_blank_lines_count(tmp_path):
    lines = good_lines()
    lines[5], lines[17] = '{"prompt": "q5"}', '{"prompt": "q17"}'
    lines.insert(2, "")  # a blank line: the bad records are on lines 7 and 19 of the file
    with pytest.raises(ValueError, match=r"data.jsonl', line 7 \(and line 19\): the record has no `completion`"):
        check_file_records(jsonl(tmp_path, lines), "dataset_name")


def test_conversations_need_a_list_of_turns(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [json.dumps({"messages": turns})] * 3 + [json.dumps({"messages": "hi"})]
    with pytest.raises(ValueError, match=r"line 4: `messages` is \"hi\" \(str\), not a list of turns"):
        check_file_records(jsonl(tmp_path, lines), "dataset_name")


def test_a_json_file_names_the_element_and_a_csv_file_the_line_its_record_starts_on(tmp_path):
    records = [dict(record) for record in GOOD]
    records[2]["completion"] = float("inf")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"element 2: `completion` is Infinity"):
        check_file_records(path, "dataset_name")
    csv = tmp_path / "data.csv"
    csv.write_text('prompt,completion\n"a question\nover two lines", an answer\nq2,\n')
    with pytest.raises(ValueError, match=r"line 4: the record has a null `completion`"):
        check_file_records(csv, "dataset_name")


def test_good_files_and_formats_it_does_not_know_pass(tmp_path):
    check_file_records(jsonl(tmp_path, good_lines()), "dataset_name")
    check_file_records(jsonl(tmp_path, [json.dumps({"question": "q", "answer": "a"})], "other.jsonl"), "x")


def test_loading_a_file_checks_its_records_before_datasets_reads_it(tmp_path):
    lines = good_lines()
    lines[3] = '{"prompt": "q3", "completion": Infinity}'
    path = jsonl(tmp_path, lines)
    with pytest.raises(ValueError, match=r"dataset_name '.*data.jsonl', line 4: `completion` is Infinity"):
        load_named(MinorSFTScriptArguments(dataset_name=str(path)))
