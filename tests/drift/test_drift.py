"""The drift measures every run logs (`minorsft_trl.drift.live`) and the drift budget, against independent
computations: a brute-force full-softmax KL, a plain-forward NLL, and runs that must not move."""

import copy
import json
import shutil

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny import (
    COMPLETIONS,
    PROMPTS,
    conversational_dataset,
    cpu_args,
    make_model,
    pretrained_adapter,
    prompt_completion_dataset,
)
from transformers import TrainerCallback

import minorsft_trl.drift.live as live_module
from minorsft_trl import MinorSFTTrainer
from minorsft_trl.drift.live import drift_log_history
from minorsft_trl.drift.measures import Sequences, sample_continuations

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def drift_args(tmp_path, **overrides):
    defaults = dict(
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        max_steps=4,
        learning_rate=5e-2,
        ref_cache_dir=str(tmp_path / "cache"),
        drift_num_prompts=6,
        drift_max_new_tokens=12,
    )
    return cpu_args(tmp_path / "out", **{**defaults, **overrides})


def make_trainer(tmp_path, tokenizer, model=None, peft_config=LORA, **overrides):
    model = model if model is not None else make_model(tokenizer)
    ref_model = overrides.pop("ref_model", None)
    return MinorSFTTrainer(
        model,
        args=drift_args(tmp_path, **overrides),
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config) if peft_config is not None else None,
        ref_model=ref_model,
    )


def drift_logs(trainer, key: str) -> list[tuple[int, float]]:
    return [(log["step"], log[key]) for log in drift_log_history(trainer.state) if key in log]


def full_softmax_forward_kl(policy, reference, samples: Sequences, pad_id: int) -> float:
    """`KL(pi_ref || pi_theta)` per scored token from the full `(batch, seq_len, vocab)` logits of both models."""
    batch = samples.batch(list(range(len(samples))), pad_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        policy_logps = policy(**inputs).logits[:, :-1].float().log_softmax(-1)
        ref_logps = reference(**inputs).logits[:, :-1].float().log_softmax(-1)
    scored = batch["labels"][:, 1:] != -100
    kl = (ref_logps.exp() * (ref_logps - policy_logps)).sum(-1)
    return (kl[scored].sum() / scored.sum()).item()


# ---------------------------------------------------------------- 0 where the policy has not moved


REFERENCES = {
    "adapters disabled": dict(loss_type="minor_sft"),
    "plain SFT, adapters disabled": dict(loss_type="nll"),
    "frozen copy (full fine-tuning)": dict(loss_type="sft_kl", peft_config=None),
    "full fine-tuning, plain SFT, no copy kept": dict(loss_type="nll", peft_config=None),
    "separate reference": dict(loss_type="minor_sft", peft_config=None, ref_model="same weights"),
    "separate reference released after the precompute": dict(
        loss_type="minor_sft", peft_config=None, ref_model="same weights", precompute_ref_log_probs=True
    ),
    "re-trained adapter, its frozen copy": dict(loss_type="minor_sft", peft_config=None, model="adapter"),
}


@pytest.mark.parametrize("reference", REFERENCES)
def test_drift_is_exactly_zero_before_training_and_with_a_zero_learning_rate(tmp_path, tokenizer, reference):
    overrides = dict(REFERENCES[reference])
    model = pretrained_adapter(tokenizer, "lora") if overrides.pop("model", None) else make_model(tokenizer)
    if overrides.get("ref_model") == "same weights":
        overrides["ref_model"] = make_model(tokenizer)
    trainer = make_trainer(tmp_path, tokenizer, model=model, learning_rate=0.0, **overrides)
    trainer.train()
    expected_key = (
        "eval_forward_kl_sampled" if "released" in reference or "no copy" in reference else "eval_forward_kl"
    )
    values = drift_logs(trainer, expected_key)
    assert [step for step, _ in values] == [0, 2, 4]
    assert all(value == 0.0 for _, value in values), values
    if "no copy" not in reference:  # plain full fine-tuning keeps no reference to compute m_theta against
        assert all(value == 0.0 for _, value in drift_logs(trainer, "eval_deviation"))


def test_drift_moves_when_the_policy_moves_and_stays_zero_before_the_first_step(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, loss_type="nll")
    trainer.train()
    values = drift_logs(trainer, "eval_forward_kl")
    assert values[0] == (0, 0.0)
    assert 0 < values[1][1] < values[2][1]


# ---------------------------------------------------------------- against independent computations


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_forward_kl_equals_a_brute_force_full_softmax_kl_after_training(tmp_path, tokenizer, architecture):
    trainer = make_trainer(tmp_path, tokenizer, model=make_model(tokenizer, architecture=architecture))
    trainer.train()
    reference = make_model(tokenizer, architecture=architecture).eval()  # the base weights LoRA leaves untouched
    pad_id = tokenizer.pad_token_id
    expected = full_softmax_forward_kl(trainer.model.eval(), reference, trainer.drift.probe.samples, pad_id)
    assert expected > 1e-3
    assert trainer.drift.metrics()["forward_kl"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert trainer.evaluate()["eval_forward_kl"] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_sampled_estimate_and_nll_change_equal_plain_forward_computations(tmp_path, tokenizer):
    """Full fine-tuning with plain SFT keeps no reference: the sampled-token estimate against the starting model's
    log-probs, and the NLL change against the starting model's NLL, computed here from plain forwards."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the sky is blue today", "2+2=4, 3+3=6"]))
    model = make_model(tokenizer)
    start = copy.deepcopy(model).eval()
    trainer = make_trainer(
        tmp_path, tokenizer, model=model, peft_config=None, loss_type="nll", drift_text_dataset=str(texts)
    )
    trainer.train()
    probe = trainer.drift.probe
    policy = trainer.model.eval()

    def mean_logp(model, sequences):
        batch = sequences.batch(list(range(len(sequences))), tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        scored = labels != -100
        logps = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return logps[scored].sum().item(), scored.sum().item()

    (start_sum, count), (policy_sum, _) = mean_logp(start, probe.samples), mean_logp(policy, probe.samples)
    (start_text, text_count), (policy_text, _) = mean_logp(start, probe.texts), mean_logp(policy, probe.texts)
    metrics = trainer.drift.metrics()
    assert metrics["forward_kl_sampled"] == pytest.approx((start_sum - policy_sum) / count, rel=1e-5)
    assert metrics["nll_change"] == pytest.approx((start_text - policy_text) / text_count, rel=1e-5)
    assert metrics["nll_change"] < 0  # the tiny model learns: its NLL falls on any text of the same bytes


def test_eval_answer_nll_is_the_held_out_nll_for_every_loss(tmp_path, tokenizer):
    """`eval_answer_nll` is plain SFT's `eval_loss` (one batch holds the whole eval split), whatever the loss."""
    values = {}
    for loss_type in ("nll", "minor_sft", "asft"):
        trainer = make_trainer(tmp_path / loss_type, tokenizer, loss_type=loss_type, per_device_eval_batch_size=8)
        metrics = trainer.evaluate()
        values[loss_type] = metrics["eval_answer_nll"]
        if loss_type == "nll":
            assert metrics["eval_answer_nll"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert values["minor_sft"] == pytest.approx(values["nll"], rel=1e-6)
    assert values["asft"] == pytest.approx(values["nll"], rel=1e-6)


# ---------------------------------------------------------------- the samples: drawn once, without side effects


def test_drawing_the_samples_changes_nothing_in_the_training_run(tmp_path, tokenizer):
    runs = {}
    for eval_drift in (True, False):
        trainer = make_trainer(tmp_path / str(eval_drift), tokenizer, eval_drift=eval_drift)
        trainer.train()
        runs[eval_drift] = (
            [log["loss"] for log in trainer.state.log_history if "loss" in log],
            {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad},
        )
    assert runs[True][0] == runs[False][0]
    for name, value in runs[True][1].items():
        torch.testing.assert_close(value, runs[False][1][name], rtol=0, atol=0)


def test_sampling_draws_from_its_own_seed_and_leaves_the_random_state_as_it_was(tokenizer):
    model = make_model(tokenizer).eval()
    prompts = [tokenizer("2+2=")["input_ids"], tokenizer("sky colour?")["input_ids"]]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample_continuations(model, prompts, [0, 1], 8, seed=5, pad_id=tokenizer.pad_token_id, eos_id=None)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(321)
    assert sample_continuations(model, prompts, [0, 1], 8, seed=5, pad_id=tokenizer.pad_token_id, eos_id=None) == first
    assert sample_continuations(model, prompts, [0, 1], 8, seed=6, pad_id=tokenizer.pad_token_id, eos_id=None) != first


def test_samples_are_drawn_once_and_read_from_the_cache(tmp_path, tokenizer, monkeypatch):
    calls = []
    original = live_module.sample_continuations
    monkeypatch.setattr(live_module, "sample_continuations", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = make_trainer(tmp_path, tokenizer, learning_rate=1e-2)
    assert not calls, "a reference that stays for the run samples at first use, not while the trainer is built"
    first.drift.ensure_probe()
    drawn = len(calls)
    second = make_trainer(tmp_path, tokenizer, learning_rate=3e-2, loss_type="nll")  # same reference
    second.drift.ensure_probe()
    assert drawn > 0 and len(calls) == drawn
    assert second.drift.probe == first.drift.probe
    third = make_trainer(tmp_path, tokenizer, drift_seed=1)
    third.drift.ensure_probe()
    assert len(calls) > drawn and third.drift.probe.samples != first.drift.probe.samples
    # A reference released after the precompute is sampled before it goes
    separate = make_model(tokenizer)
    released = make_trainer(
        tmp_path / "released", tokenizer, peft_config=None, ref_model=separate, precompute_ref_log_probs=True
    )
    assert released.ref_model is None and released.drift.probe is not None


# ---------------------------------------------------------------- the budget


def test_the_budget_stops_at_the_first_evaluation_over_it_and_keeps_the_last_checkpoint_within(
    tmp_path, tokenizer, warnings_of_minorsft
):
    free = make_trainer(tmp_path / "free", tokenizer, max_steps=6)
    free.train()
    kl = dict(drift_logs(free, "eval_forward_kl"))
    assert kl[2] < kl[4] < kl[6]
    budget = (kl[2] + kl[4]) / 2
    trainer = make_trainer(
        tmp_path / "budget", tokenizer, max_steps=6, max_forward_kl=budget, save_strategy="steps", save_steps=2
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert drift_logs(trainer, "eval_forward_kl") == [(0, 0.0), (2, kl[2]), (4, kl[4])]
    checkpoint = str(tmp_path / "budget" / "out" / "checkpoint-2")
    assert trainer._drift_budget.within_budget_checkpoint == checkpoint
    assert not (tmp_path / "budget" / "out" / "checkpoint-4").exists()
    assert trainer.drift.metrics()["forward_kl"] == pytest.approx(kl[2], rel=1e-6)
    assert any("Drift budget exceeded at step 4" in w and "checkpoint-2" in w for w in warnings_of_minorsft)


class StopAt(TrainerCallback):
    """Ends training after `step` (its evaluation and checkpoint included), as an interruption would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


BUDGETED = dict(save_strategy="steps", save_steps=2)


def test_a_resumed_run_keeps_the_checkpoint_within_budget_it_resumed_from(tmp_path, tokenizer):
    free = make_trainer(tmp_path / "free", tokenizer, max_steps=6)
    free.train()
    kl = dict(drift_logs(free, "eval_forward_kl"))
    budget = (kl[2] + kl[4]) / 2
    interrupted = make_trainer(tmp_path / "budget", tokenizer, max_steps=6, max_forward_kl=budget, **BUDGETED)
    interrupted.add_callback(StopAt(2))
    interrupted.train()
    checkpoint = tmp_path / "budget" / "out" / "checkpoint-2"
    assert interrupted.state.global_step == 2 and checkpoint.is_dir()
    resumed = make_trainer(tmp_path / "budget", tokenizer, max_steps=6, max_forward_kl=budget, **BUDGETED)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4 and resumed._drift_budget.exceeded[0] == 4
    assert resumed.drift.metrics()["forward_kl"] == pytest.approx(kl[2], rel=1e-5)
    resumed.save_state()
    state = json.loads((tmp_path / "budget" / "out" / "trainer_state.json").read_text())
    assert (state["best_global_step"], state["best_model_checkpoint"]) == (2, str(checkpoint))


@pytest.mark.parametrize("peft_config", [LORA, None], ids=["LoRA", "full fine-tuning"])
def test_a_first_evaluation_over_budget_gives_back_the_starting_model(tmp_path, tokenizer, peft_config):
    """The model the run starts from is within budget (its forward KL is 0): it is kept as `checkpoint-0`, so the
    result of a run whose first evaluation is already over budget is that model, not the one over budget."""
    trainer = make_trainer(tmp_path, tokenizer, peft_config=peft_config, max_forward_kl=1e-9, **BUDGETED)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer._drift_budget.exceeded[0] == 2
    assert trainer.drift.metrics()["forward_kl"] == pytest.approx(0.0, abs=1e-9)
    assert (trainer.state.best_global_step, trainer.state.best_model_checkpoint) == (
        0,
        str(tmp_path / "out" / "checkpoint-0"),
    )
    assert not (tmp_path / "out" / "checkpoint-2").exists()


class RemoveCheckpoint(TrainerCallback):
    """Removes `checkpoint` after every step, as a user cleaning the output directory would."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def on_step_end(self, args, state, control, **kwargs):
        shutil.rmtree(self.checkpoint, ignore_errors=True)


def test_a_run_over_budget_whose_checkpoint_within_it_is_gone_stops_with_an_error(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, max_forward_kl=1e-9, **BUDGETED)
    trainer.add_callback(RemoveCheckpoint(tmp_path / "out" / "checkpoint-0"))
    with pytest.raises(RuntimeError, match="checkpoint-0, is missing or incomplete .* the model in memory is over"):
        trainer.train()


def test_a_starting_model_already_over_budget_stops_before_the_first_step(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, peft_config=None, ref_model=make_model(tokenizer, seed=1), max_forward_kl=1e-6, **BUDGETED
    )
    with pytest.raises(ValueError, match="the model it starts from is already over the drift budget"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "out" / "checkpoint-0").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_forward_kl=0.0), "max_forward_kl must be a finite number > 0, got 0.0"),
        (dict(max_forward_kl=-1.0), "max_forward_kl must be a finite number > 0, got -1.0"),
        (dict(max_forward_kl=0.5, eval_strategy="no"), "eval_strategy='no'"),
        (dict(max_forward_kl=0.5, eval_drift=False), "eval_drift=False"),
        (dict(max_forward_kl=0.5, save_strategy="steps", save_steps=3), "save_steps a multiple of eval_steps"),
        (dict(max_forward_kl=0.5, save_strategy="no"), "but save_strategy='no'"),
        (dict(drift_num_prompts=0), "drift_num_prompts must be an integer >= 1, got 0"),
    ],
)
def test_bad_drift_settings_are_refused_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        drift_args(tmp_path, **overrides)


def test_drift_settings_without_an_eval_split_are_refused_before_the_output_directory_is_made(tmp_path, tokenizer):
    args = drift_args(tmp_path, eval_strategy="no", drift_text_dataset="texts.jsonl")
    with pytest.raises(ValueError, match="no eval dataset"):
        MinorSFTTrainer(
            make_model(tokenizer), args=args, train_dataset=prompt_completion_dataset(), processing_class=tokenizer
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "rows, setting, message",
    [
        ([], "drift_text_dataset", "is an empty file"),
        ([{"question": "hi"}], "drift_text_dataset", "give it a `text` column"),
        ([{"text": ""}], "drift_text_dataset", "fewer than 2 tokens"),
        ([{"prompt": "x" * 80}], "drift_prompts", "longer than max_length=64"),
        ([{"text": "a prompt?"}], "drift_prompts", "give it a `prompt` column"),
    ],
)
def test_bad_drift_data_is_refused_before_training(tmp_path, tokenizer, rows, setting, message):
    path = tmp_path / "drift.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, tokenizer, **{setting: str(path)})
    assert not (tmp_path / "out").exists()


def test_named_prompts_are_rendered_by_the_chat_template(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    conversation = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    trainer = make_trainer(tmp_path, tokenizer, drift_prompts=str(path))
    trainer.drift.ensure_probe()
    expected = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert trainer.drift.probe.samples.prompt_ids == [tokenizer(expected, add_special_tokens=False)["input_ids"]]


# ---------------------------------------------------------------- the prompts: each example's tokens before its answer


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def drift_prompts_of(tmp_path, tokenizer, train, evaluation, **overrides) -> list[list[int]]:
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=drift_args(tmp_path, drift_num_prompts=8, **overrides),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(LORA),
    )
    return trainer.drift.plan[1]


EVAL_FORMATS = {
    "prompt-completion": (prompt_completion_dataset, {}),
    "prompt-completion, trained on every token": (prompt_completion_dataset, {"completion_only_loss": False}),
    "prompt-completion, packed": (prompt_completion_dataset, {"packing": True}),
    "prompt-completion, padding-free": (prompt_completion_dataset, {"padding_free": True, "max_length": None}),
    "conversations, assistant-only loss": (conversational_dataset, {"assistant_only_loss": True}),
    "conversations, trained on every turn": (conversational_dataset, {}),
    "conversations, packed": (conversational_dataset, {"assistant_only_loss": True, "packing": True}),
}


@pytest.mark.parametrize("data_format", EVAL_FORMATS)
def test_the_drift_prompts_end_where_each_eval_example_answer_begins(tmp_path, tokenizer, data_format):
    make_dataset, overrides = EVAL_FORMATS[data_format]
    prompts = drift_prompts_of(tmp_path, tokenizer, make_dataset(), make_dataset(), **overrides)
    if "conversations" in data_format:
        expected = [chat_prompt_ids(tokenizer, prompt) for prompt in PROMPTS]
    else:
        expected = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    # Packing reorders the examples (and holds several in a row): the same prompts, one per example
    assert sorted(prompts) == sorted(expected)
    if "packed" not in data_format:
        assert prompts == expected


def test_plain_text_has_no_answer_and_its_drift_prompts_are_the_first_half_of_each_example(tmp_path, tokenizer):
    texts = Dataset.from_dict({"text": [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]})
    prompts = drift_prompts_of(tmp_path, tokenizer, texts, texts)
    ids = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts["text"]]
    assert prompts == [row[: len(row) // 2] for row in ids]


def test_sampling_ignores_the_model_generation_config(tokenizer):
    prompts = [tokenizer("2+2=")["input_ids"], tokenizer("sky colour?")["input_ids"]]
    kwargs = dict(seed=5, pad_id=tokenizer.pad_token_id, eos_id=None)
    plain = sample_continuations(make_model(tokenizer).eval(), prompts, [0, 1], 16, **kwargs)
    shipped = make_model(tokenizer).eval()
    # What a model's generation_config.json may ship (Qwen2-7B-Instruct: repetition_penalty 1.05, top_k 20, ...),
    # and a processor whose effect on a tiny random model is certain: the first tokens drawn suppressed
    shipped.generation_config.update(
        repetition_penalty=3.0, top_k=2, top_p=0.5, temperature=0.3, suppress_tokens=[row[0] for row in plain]
    )
    assert sample_continuations(shipped, prompts, [0, 1], 16, **kwargs) == plain
    assert shipped.generation_config.repetition_penalty == 3.0  # given back as it was


def test_a_peft_model_without_trainer_peft_config_measures_against_its_frozen_adapter(tmp_path, tokenizer):
    model = get_peft_model(make_model(tokenizer), copy.deepcopy(LORA))
    trainer = make_trainer(tmp_path, tokenizer, model=model, peft_config=None, loss_type="nll", learning_rate=0.0)
    trainer.train()
    assert all(value == 0.0 for _, value in drift_logs(trainer, "eval_forward_kl"))


def test_the_curves_and_the_model_card_show_the_drift_and_the_budget(tmp_path, tokenizer):
    from matplotlib.image import imread

    from minorsft_trl.drift.curves import plot_training_curves

    trainer = make_trainer(tmp_path, tokenizer, max_forward_kl=1e-9, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Drift from the reference" in card and "| 0 | 0 |" in card
    assert "exceeded at step 2" in card and "the starting model (checkpoint-0, step 0)" in card
    logs = trainer.state.log_history
    with_drift = plot_training_curves(logs, tmp_path / "with.png", max_forward_kl=1e-9)
    without = plot_training_curves([log for log in logs if "eval_forward_kl" not in log], tmp_path / "without.png")
    panel_width = imread(without).shape[1] / 3  # loss, deviation, minor_weight
    assert imread(with_drift).shape[1] == pytest.approx(4 * panel_width, abs=2)


def test_an_evaluation_of_several_eval_datasets_measures_the_drift_once(tmp_path, tokenizer, monkeypatch):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=drift_args(tmp_path),
        train_dataset=prompt_completion_dataset(),
        eval_dataset={"a": prompt_completion_dataset(4), "b": prompt_completion_dataset(6)},
        processing_class=tokenizer,
        peft_config=copy.deepcopy(LORA),
    )
    calls = []
    measure = trainer.drift.metrics
    monkeypatch.setattr(trainer.drift, "metrics", lambda: calls.append(1) or measure())
    metrics = trainer.evaluate()
    assert len(calls) == 1 and metrics["eval_forward_kl"] == 0.0
    assert {"eval_a_loss", "eval_b_loss"} <= metrics.keys()
    assert sum("eval_forward_kl" in log for log in trainer.state.log_history) == 1
