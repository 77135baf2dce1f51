"""`MinorSFTTrainer` as a drop-in for TRL's `SFTTrainer`: the data it reads, checked against stock `SFTTrainer` itself
(the independent code path), not against a copy of its list of formats."""

import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig
from test_gradients import _perturb_lora, lora_config
from tiny import COMPLETIONS, PROMPTS, conversational_dataset, cpu_args, make_model, prompt_completion_dataset
from transformers import TrainerState
from trl import SFTConfig, SFTTrainer

from minorsft_trl import MinorSFTTrainer
from minorsft_trl.drift.live import drift_log_history
from minorsft_trl.reference.models import active_dropouts


def sharegpt_dataset() -> Dataset:
    """LLaMA-Factory's and axolotl's format: `conversations` of `{"from", "value"}` turns."""
    return Dataset.from_dict(
        {
            "conversations": [
                [{"from": "user", "value": p}, {"from": "assistant", "value": c.strip()}]
                for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
            ]
        }
    )


def streamed(dataset: Dataset) -> IterableDataset:
    rows = dataset.to_list()
    return IterableDataset.from_generator(lambda: iter(rows))


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# A dataset and the `SFTConfig` fields it needs: the formats TRL documents for SFT, and shapes next to them it refuses
DATASETS = {
    "language modelling": lambda tok: (
        Dataset.from_dict({"text": [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]}),
        {},
    ),
    "language modelling, own text field": lambda tok: (
        Dataset.from_dict({"content": [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]}),
        {"dataset_text_field": "content"},
    ),
    "conversational": lambda tok: (conversational_dataset(), {}),
    "conversational, extra columns": lambda tok: (conversational_dataset().add_column("id", list(range(8))), {}),
    "conversational, assistant only": lambda tok: (conversational_dataset(), {"assistant_only_loss": True}),
    "ShareGPT conversations": lambda tok: (sharegpt_dataset(), {}),
    "ShareGPT conversations, assistant only": lambda tok: (sharegpt_dataset(), {"assistant_only_loss": True}),
    "ShareGPT conversations, streamed": lambda tok: (streamed(sharegpt_dataset()), {}),
    "prompt-completion": lambda tok: (prompt_completion_dataset(), {}),
    "conversational prompt-completion": lambda tok: (
        Dataset.from_dict({"prompt": [user(p) for p in PROMPTS], "completion": [assistant(c) for c in COMPLETIONS]}),
        {},
    ),
    "tokenised": lambda tok: (
        Dataset.from_dict({"input_ids": [tok(p + c)["input_ids"] for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]}),
        {},
    ),
    # Shapes stock SFTTrainer does not read either
    "conversations of role/content turns": lambda tok: (
        Dataset.from_dict({"conversations": conversational_dataset()["messages"]}),
        {},
    ),
    "prompt without completion": lambda tok: (Dataset.from_dict({"prompt": PROMPTS}), {}),
    "preference (DPO's format)": lambda tok: (
        Dataset.from_dict({"prompt": PROMPTS, "chosen": COMPLETIONS, "rejected": COMPLETIONS[::-1]}),
        {},
    ),
    "question and answer": lambda tok: (Dataset.from_dict({"question": PROMPTS, "answer": COMPLETIONS}), {}),
}


def reads(build) -> bool:
    try:
        build()
    except Exception:  # whichever error: whether the trainer reads the data is the question
        return False
    return True


@pytest.mark.parametrize("shape", DATASETS)
def test_with_nll_every_dataset_stock_sft_trainer_reads_is_read_and_no_other(tmp_path, tokenizer, shape):
    def stock():
        dataset, fields = DATASETS[shape](tokenizer)
        args = SFTConfig(str(tmp_path / "stock"), use_cpu=True, report_to=[], max_steps=1, max_length=64, **fields)
        return SFTTrainer(make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)

    def ours():
        dataset, fields = DATASETS[shape](tokenizer)
        args = cpu_args(tmp_path / "ours", loss_type="nll", max_steps=1, **fields)
        return MinorSFTTrainer(make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer)

    if shape == "ShareGPT conversations, assistant only":
        # TRL checks for conversations before it converts ShareGPT's ("the dataset is not conversational"); the roles
        # are mapped to `messages` before TRL sees the data here (`minorsft_trl.data.sharegpt`), so it reads
        assert reads(ours) and not reads(stock)
    else:
        assert reads(ours) == reads(stock)


def test_sharegpt_conversations_train_minor_sft_from_the_reference(tmp_path, tokenizer):
    """Converted to `messages`, and the reference scores the same tokens: `deviation` is 0 at step 0."""
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, max_steps=1),
        train_dataset=sharegpt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.log_history[0]["deviation"] == 0.0


# ---------------------------------------------------------------- dropout and NEFTune


def dropout_trainer(tmp_path, tokenizer, **overrides):
    """LoRA with `lora_dropout` (an `nn.Dropout`) on a model with attention dropout (functional, in Llama)."""
    return MinorSFTTrainer(
        make_model(tokenizer, attention_dropout=0.3),
        args=cpu_args(tmp_path, max_steps=1, **overrides),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.3),
    )


@pytest.mark.parametrize("loss_type", ["minor_sft", "sft_kl"])
def test_dropout_is_off_where_training_reads_the_reference_so_it_starts_at_zero(tmp_path, tokenizer, loss_type):
    trainer = dropout_trainer(tmp_path, tokenizer, loss_type=loss_type)
    assert active_dropouts(trainer.model) == []
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["deviation"] == 0.0
    assert first.get("minor_weight", 1.0) == 1.0 and first.get("kl", 0.0) == 0.0


def test_with_dropout_kept_the_start_is_noise_and_a_warning_says_so(tmp_path, tokenizer, warnings_of_minorsft):
    trainer = dropout_trainer(tmp_path, tokenizer, disable_dropout=False)
    assert len(active_dropouts(trainer.model)) == 6  # per layer: the q and v LoRA dropouts, the attention
    assert any("disable_dropout=False with" in message for message in warnings_of_minorsft)
    trainer.train()
    assert trainer.state.log_history[0]["deviation"] != 0.0


def test_plain_sft_keeps_the_models_dropout_as_sft_trainer_does(tmp_path, tokenizer):
    trainer = dropout_trainer(tmp_path, tokenizer, loss_type="nll")
    assert active_dropouts(trainer.model)


# ---------------------------------------------------------------- packed evaluation of unpacked training


def evaluated(tmp_path, tokenizer, eval_packing, precompute):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(
            tmp_path / f"packed-{eval_packing}-{precompute}", eval_packing=eval_packing, max_length=256,
            per_device_eval_batch_size=8, precompute_ref_log_probs=precompute, ref_cache_dir=str(tmp_path / "cache"),
            eval_drift=False,
        ),
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )  # fmt: skip
    _perturb_lora(trainer.model)  # the policy away from its reference: per-example weights differ
    return trainer, trainer.evaluate()


@pytest.mark.parametrize("precompute", [False, True], ids=["on the fly", "precomputed"])
def test_packed_eval_rows_of_unpacked_training_are_scored_per_example(tmp_path, tokenizer, precompute):
    """`packing=False, eval_packing=True`: TRL packs the eval rows and collates them with the training collator,
    which gives them no `position_ids`; each packed row must still be its examples, each attending to itself."""
    packed_trainer, packed = evaluated(tmp_path, tokenizer, eval_packing=True, precompute=precompute)
    assert len(packed_trainer.eval_dataset) < 8  # the 8 examples are packed into fewer rows
    _, unpacked = evaluated(tmp_path, tokenizer, eval_packing=False, precompute=precompute)
    for key in ("eval_loss", "eval_deviation", "eval_minor_weight", "eval_minor_weight_min", "eval_answer_nll"):
        assert packed[key] == pytest.approx(unpacked[key], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------- the log as TRL writes it


def log_shape(log_history: list[dict]) -> list[tuple[int, str]]:
    """Each entry of a log in order: its step, and whether it is an evaluation, a training log or the run's summary."""
    return [
        (log["step"], "eval" if any(k.startswith("eval_") for k in log) else "train" if "loss" in log else "summary")
        for log in log_history
    ]


def test_the_log_keeps_sft_trainers_shape_and_the_state_keeps_the_drift_before_the_first_step(tmp_path, tokenizer):
    """TRL's own tests read `log_history[0]` as the first evaluation (`eval_steps` below `logging_steps`): the drift
    measured before the first step adds no log entry of its own. It is kept in the trainer state, which a checkpoint
    saves and a resumed run reads back (with transformers' restore of callback states or without)."""
    shared = dict(
        max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=3, save_strategy="steps", save_steps=2
    )
    stock = SFTTrainer(
        make_model(tokenizer),
        args=SFTConfig(
            str(tmp_path / "stock"), use_cpu=True, bf16=False, report_to=[], max_length=64, disable_tqdm=True, **shared
        ),
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
    )
    stock.train()

    def ours(restore_callback_states_from_checkpoint=False):
        return MinorSFTTrainer(
            make_model(tokenizer),
            args=cpu_args(
                tmp_path / "ours", restore_callback_states_from_checkpoint=restore_callback_states_from_checkpoint,
                drift_num_prompts=4, drift_max_new_tokens=4, ref_cache_dir=str(tmp_path / "cache"), **shared,
            ),
            train_dataset=prompt_completion_dataset(),
            eval_dataset=prompt_completion_dataset(),
            processing_class=tokenizer,
            peft_config=lora_config(),
        )  # fmt: skip

    trainer = ours()
    trainer.train()
    assert log_shape(trainer.state.log_history) == log_shape(stock.state.log_history)
    assert trainer.state.log_history[0]["eval_loss"] > 0
    at_start = {"step": 0, "eval_forward_kl": 0.0}
    assert drift_log_history(trainer.state)[0] == at_start
    assert drift_log_history(trainer.state)[1:] == trainer.state.log_history
    for restore in (False, True):
        resumed = ours(restore_callback_states_from_checkpoint=restore)
        resumed.train(resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-2"))
        assert log_shape(resumed.state.log_history) == log_shape(stock.state.log_history)
        saved = TrainerState.load_from_json(str(tmp_path / "ours" / "checkpoint-4" / "trainer_state.json"))
        assert drift_log_history(resumed.state)[0] == drift_log_history(saved)[0] == at_start


def test_with_eval_on_start_trls_own_evaluation_at_step_0_is_the_drift_before_the_first_step(
    tmp_path, tokenizer, monkeypatch
):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(
            tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1, eval_on_start=True, drift_num_prompts=4,
            drift_max_new_tokens=4, ref_cache_dir=str(tmp_path / "cache"),
        ),
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )  # fmt: skip
    measured = []
    measure = trainer.drift.metrics
    monkeypatch.setattr(trainer.drift, "metrics", lambda: measured.append(1) or measure())
    trainer.train()
    assert len(measured) == 2  # the evaluations at steps 0 and 1, and no third measurement
    first = trainer.state.log_history[0]
    assert first["step"] == 0 and first["eval_forward_kl"] == 0.0 and "eval_loss" in first
    assert drift_log_history(trainer.state) == trainer.state.log_history


# ---------------------------------------------------------------- evaluating a dataset not given at init


def moved_full_fine_tuning(tmp_path, tokenizer, precompute):
    """Full fine-tuning with training data only (as TRL's tests build it), its policy then moved away from the frozen
    copy that is its reference, the same way for every `precompute`."""
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(
            tmp_path / str(precompute), precompute_ref_log_probs=precompute, ref_cache_dir=str(tmp_path / "cache"),
            per_device_eval_batch_size=8,
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return trainer


@pytest.mark.parametrize("shape", ["dataset", "dict of datasets"])
def test_evaluating_a_dataset_not_given_at_init_scores_it_against_the_runs_reference(tmp_path, tokenizer, shape):
    """`trainer.evaluate(eval_dataset=raw)` (TRL issue 6115) under the default "auto", which precomputed the training
    data only: the frozen copy stays to score the new data, with the values of a reference run on the fly."""
    raw = prompt_completion_dataset()
    eval_dataset = raw if shape == "dataset" else {"held_out": raw}
    auto = moved_full_fine_tuning(tmp_path, tokenizer, "auto")
    assert auto.args.precompute_ref_log_probs is True
    metrics = auto.evaluate(eval_dataset=eval_dataset)
    expected = moved_full_fine_tuning(tmp_path, tokenizer, False).evaluate(eval_dataset=eval_dataset)
    loss_key = "eval_loss" if shape == "dataset" else "eval_held_out_loss"
    assert metrics[loss_key] == pytest.approx(expected[loss_key], rel=1e-5)
    for key in ("eval_deviation", "eval_minor_weight", "eval_minor_weight_min"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert abs(metrics["eval_deviation"]) > 1e-3  # scored against the reference, not the moved policy


# ---------------------------------------------------------------- a loss that is not finite


def overflowing_float16_run(tmp_path, tokenizer, loss_type: str | None):
    """float16 weights and learning rate 100: Adam moves every weight by about 100 at the first step, and the forward
    of the second overflows (TRL's `test_train_model_dtype` reaches it at step 4). `loss_type=None`: stock
    `SFTTrainer`."""
    shared = dict(max_steps=3, learning_rate=100.0, logging_steps=1, max_length=64, save_strategy="no")
    if loss_type is None:
        args = SFTConfig(str(tmp_path / "stock"), use_cpu=True, bf16=False, report_to=[], disable_tqdm=True, **shared)
        trainer_class = SFTTrainer
    else:
        args, trainer_class = cpu_args(tmp_path / loss_type, loss_type=loss_type, **shared), MinorSFTTrainer
    return trainer_class(
        make_model(tokenizer).half(), args=args, train_dataset=prompt_completion_dataset(), processing_class=tokenizer
    )


NON_FINITE_CAUSE = (
    "The training loss is nan at step 1: the weights are finite, but the forward is not: a float16 overflow "
    "(train in bf16 or float32)"
)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_with_trls_own_losses_a_non_finite_loss_trains_on_as_sft_trainer_does_and_says_why_once(
    tmp_path, tokenizer, warnings_of_minorsft, loss_type
):
    stock = overflowing_float16_run(tmp_path, tokenizer, None)
    stock.train()
    trainer = overflowing_float16_run(tmp_path, tokenizer, loss_type)
    trainer.train()
    assert trainer.state.global_step == stock.state.global_step == 3
    if loss_type == "nll":  # TRL's loss and TRL's forward: the same log
        assert log_shape(trainer.state.log_history) == log_shape(stock.state.log_history)
        assert [log.get("loss") for log in trainer.state.log_history] == [
            log.get("loss") for log in stock.state.log_history
        ]
    said = [message for message in warnings_of_minorsft if message.startswith("The training loss is")]
    assert len(said) == 1 and said[0].startswith(NON_FINITE_CAUSE), said
    assert f"With loss_type={loss_type!r} training goes on" in said[0]


@pytest.mark.parametrize("loss_type", ["minor_sft", "iw_sft"])
def test_a_non_finite_loss_stops_a_loss_that_reads_the_reference(tmp_path, tokenizer, loss_type):
    trainer = overflowing_float16_run(tmp_path, tokenizer, loss_type)
    with pytest.raises(RuntimeError) as stopped:
        trainer.train()
    assert str(stopped.value).startswith(NON_FINITE_CAUSE)
    assert f"Training stops here, before a broken model is saved: loss_type={loss_type!r}" in str(stopped.value)
    assert trainer.state.global_step == 1
