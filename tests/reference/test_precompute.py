"""Reference log-probs computed once and cached: same training as on the fly, and a cache that is never trusted
blindly."""

import numpy as np
import pytest
import torch
from datasets import IterableDataset
from peft import LoraConfig
from test_gradients import BETA, lora_config, one_step_gradients, step_args
from tiny import conversational_dataset, cpu_args, make_model, prompt_completion_dataset

from minorsft_trl import MinorSFTTrainer


def build(tmp_path, tokenizer, dataset=None, ref_seed=None, args_fn=cpu_args, **overrides):
    overrides.setdefault("ref_cache_dir", str(tmp_path / "ref-cache"))
    overrides.setdefault("beta", BETA)
    kwargs = {"ref_model": make_model(tokenizer, seed=ref_seed)} if ref_seed is not None else {}
    return MinorSFTTrainer(
        make_model(tokenizer),
        args=args_fn(tmp_path / "out", **overrides),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=None if ref_seed is not None else lora_config(),
        **kwargs,
    )


ACCUMULATE_2 = {"gradient_accumulation_steps": 2}


def no_reference_forward(*args, **kwargs):
    raise AssertionError("a reference forward ran although the reference log-probs were precomputed")


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(ref_seed=1),
        dict(ref_seed=1, packing=True),
        dict(ref_seed=1, padding_free=True, max_length=None, per_device_train_batch_size=4, **ACCUMULATE_2),
    ],
    ids=["lora, adapters disabled", "separate reference", "packed", "padding-free, accumulation"],
)
@pytest.mark.parametrize("loss_type", ["minor_sft", "sft_dpo"])
def test_precomputed_and_on_the_fly_reference_give_the_same_gradients(tmp_path, tokenizer, setting, loss_type):
    def gradients(precompute):
        trainer = build(
            tmp_path, tokenizer, args_fn=step_args, loss_type=loss_type, precompute_ref_log_probs=precompute, **setting
        )
        if "ref_seed" in setting:
            # A separate reference is released once its numbers are computed
            assert (trainer.ref_model is None) == precompute
        if precompute:
            trainer.reference.token_logps = no_reference_forward
        return one_step_gradients(trainer)

    on_the_fly, precomputed = gradients(False), gradients(True)
    for name, grad in on_the_fly.items():
        torch.testing.assert_close(precomputed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_precomputed_training_logs_the_same_losses_and_deviation(tmp_path, tokenizer):
    def history(precompute):
        trainer = build(
            tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=precompute, max_steps=3,
            per_device_train_batch_size=4, learning_rate=1e-2,
        )  # fmt: skip
        trainer.train()
        return [(log["loss"], log["deviation"]) for log in trainer.state.log_history if "loss" in log]

    for (loss, dev), (loss_pre, dev_pre) in zip(history(False), history(True), strict=True):
        assert loss_pre == pytest.approx(loss, rel=1e-5) and dev_pre == pytest.approx(dev, rel=1e-4, abs=1e-6)


def test_second_run_with_another_learning_rate_and_beta_reuses_the_cache(tmp_path, tokenizer, count_reference_passes):
    first = build(tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=True)
    second = build(tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=True, learning_rate=0.3, beta=0.1)
    assert count_reference_passes == ["train"]
    assert first.train_dataset["ref_logps"] == second.train_dataset["ref_logps"]


@pytest.mark.parametrize(
    "change",
    [
        dict(ref_seed=2),  # other reference weights
        dict(dataset=prompt_completion_dataset().map(lambda e: {"completion": e["completion"] + "?"})),
        dict(max_length=12),
        dict(packing=True),
        dict(completion_only_loss=False),
        dict(padding_free=True, max_length=None),
        dict(dataset=conversational_dataset(), assistant_only_loss=True),
    ],
    ids=["reference weights", "data", "max_length", "packing", "completion-only", "padding-free", "assistant-only"],
)
def test_any_change_of_the_key_recomputes(tmp_path, tokenizer, count_reference_passes, change):
    baseline = {"ref_seed": 1}
    if "assistant_only_loss" in change:
        baseline["dataset"] = conversational_dataset()
    build(tmp_path, tokenizer, precompute_ref_log_probs=True, **baseline)
    build(tmp_path, tokenizer, precompute_ref_log_probs=True, **{**baseline, **change})
    assert count_reference_passes == ["train", "train"]


def test_the_adapter_disabled_reference_is_keyed_by_the_base_weights_alone(
    tmp_path, tokenizer, count_reference_passes
):
    # With adapters disabled the reference is the base model: neither a new LoRA initialisation, nor other LoRA target
    # modules, nor a separate copy of the same base weights invalidate the cache
    build(tmp_path, tokenizer, precompute_ref_log_probs=True)
    build(tmp_path, tokenizer, precompute_ref_log_probs=True, seed=123)
    MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(
            tmp_path / "out", beta=BETA, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "ref-cache")
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules=["k_proj"]),
    )
    build(tmp_path, tokenizer, precompute_ref_log_probs=True, ref_seed=0)  # full fine-tuning, reference = seed-0 copy
    assert count_reference_passes == ["train"]


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "deleted manifest"])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path, tokenizer, count_reference_passes, damage):
    first = build(tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=True)
    (values_file,) = (tmp_path / "ref-cache").glob("*/ref_logps.npy")
    if damage == "corrupt":
        values = np.load(values_file)
        np.save(values_file, values + 1.0)
    elif damage == "truncated":
        values_file.write_bytes(values_file.read_bytes()[:-8])
    else:
        (values_file.parent / "manifest.json").unlink()
    second = build(tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=True)
    assert count_reference_passes == ["train", "train"]
    assert second.train_dataset["ref_logps"] == first.train_dataset["ref_logps"]


def test_resume_from_checkpoint_reuses_the_cache(tmp_path, tokenizer, count_reference_passes):
    settings = dict(
        ref_seed=1, precompute_ref_log_probs=True, max_steps=2, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=1, learning_rate=1e-2,
    )  # fmt: skip
    build(tmp_path, tokenizer, **settings).train()
    resumed = build(tmp_path, tokenizer, **{**settings, "max_steps": 3})
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert count_reference_passes == ["train"]
    assert resumed.state.global_step == 3


def test_eval_data_is_precomputed_too(tmp_path, tokenizer, count_reference_passes):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache")),
        train_dataset=prompt_completion_dataset(),
        eval_dataset={"a": prompt_completion_dataset(4), "b": prompt_completion_dataset(2)},
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert count_reference_passes == ["train", "eval a", "eval b"]
    metrics = trainer.evaluate()
    # TRL logs its own metrics of every eval dataset under the "eval_" prefix; ours follow
    assert metrics["eval_deviation"] == 0.0 and {"eval_a_loss", "eval_b_loss"} <= metrics.keys()


def test_a_dataset_given_to_evaluate_later_falls_back_to_the_reference_forward(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer, precompute_ref_log_probs=True)
    metrics = trainer.evaluate(eval_dataset=prompt_completion_dataset(4))
    assert metrics["eval_deviation"] == 0.0 and metrics["eval_minor_weight"] == 1.0


def test_a_released_separate_reference_cannot_score_a_later_dataset(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=True)
    with pytest.raises(
        ValueError,
        match=r"reference log-probs of 'eval' were not precomputed, and precompute_ref_log_probs=True released the "
        r"reference model .* or leave precompute_ref_log_probs at 'auto'",
    ):
        trainer.evaluate(eval_dataset=prompt_completion_dataset(4))


def test_a_setting_that_leaves_the_tokenised_data_unchanged_reuses_the_cache(
    tmp_path, tokenizer, count_reference_passes
):
    # No example is longer than 64 tokens: max_length 64 and 256 give the same data, hence the same numbers
    build(tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=True, max_length=64)
    build(tmp_path, tokenizer, ref_seed=1, precompute_ref_log_probs=True, max_length=256)
    assert count_reference_passes == ["train"]


# ---------------------------------------------------------------- the default, "auto"


def auto_trainer(tmp_path, tokenizer, loss_type="minor_sft", dataset=None, **kwargs):
    return MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path / "out", loss_type=loss_type, precompute_ref_log_probs="auto",
                      ref_cache_dir=str(tmp_path / "cache"), max_steps=1),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("loss_type", "streamed", "on", "said"),
    [
        ("minor_sft", False, True, "precompute_ref_log_probs='auto': on."),
        ("iw_sft", False, True, "precompute_ref_log_probs='auto': on."),
        ("asft", False, True, "with the KL anchor's top ref_top_k=64 tokens and ref_tail_samples=32 draws"),
        ("sft_kl", False, True, "with the KL anchor's top ref_top_k=64 tokens and ref_tail_samples=32 draws"),
        ("minor_sft", True, False, "off, a dataset is streamed (an IterableDataset)"),
    ],
    ids=["minor_sft", "iw_sft", "asft", "sft_kl", "streamed"],
)
def test_auto_precomputes_wherever_it_can_serve_and_says_which(
    tmp_path, tokenizer, count_reference_passes, warnings_of_minorsft, loss_type, streamed, on, said
):
    dataset = prompt_completion_dataset()
    if streamed:
        rows = dataset.to_list()
        dataset = IterableDataset.from_generator(lambda: iter(rows))
    trainer = auto_trainer(tmp_path, tokenizer, loss_type, dataset)
    assert trainer.args.precompute_ref_log_probs is on
    assert count_reference_passes == (["train"] if on else [])
    assert sum("precompute_ref_log_probs='auto'" in m for m in warnings_of_minorsft) == 1
    assert any(said in m for m in warnings_of_minorsft), warnings_of_minorsft
    trainer.train()  # never an error


def test_auto_with_an_unwritable_cache_runs_the_reference_on_the_fly_and_says_why(
    tmp_path, tokenizer, warnings_of_minorsft
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path / "out", precompute_ref_log_probs="auto", ref_cache_dir=str(blocker / "cache")),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert trainer.args.precompute_ref_log_probs is False
    assert any("'auto': off, the cache directory" in m and "is not writable" in m for m in warnings_of_minorsft)
