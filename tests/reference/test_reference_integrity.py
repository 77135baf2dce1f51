"""The reference is exactly the model the user meant, or the run stops: paths that once gave a wrong reference or a
silently different run, and the reference self-check at the start of training."""

import copy
import dataclasses
import re

import pytest
import torch
from accelerate.state import AcceleratorState
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from test_gradients import BETA, lora_config, whole_dataset_batch
from test_reference import train_args
from tiny import (
    ADAPTERS,
    conversational_dataset,
    cpu_args,
    fused_logps,
    make_model,
    make_tokenizer,
    pretrained_adapter,
    prompt_completion_dataset,
)
from trl import SFTConfig
from trl.trainer.utils import add_fused_lm_head

import minorsft_trl.reference.models as reference_module
import minorsft_trl.reference.reference as reference_object
from minorsft_trl import MinorSFTConfig, MinorSFTTrainer
from minorsft_trl.reference.precompute import ReferencePrecompute

# ---------------------------------------------------------------- 1. re-trained adapters of every PEFT type


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_retrained_adapter_of_any_peft_type_is_compared_with_a_frozen_copy_of_itself(tmp_path, tokenizer, adapter):
    model = pretrained_adapter(tokenizer, adapter)
    initial = copy.deepcopy(model)  # taken before the trainer patches the forward
    add_fused_lm_head(initial.get_base_model())
    trainer = MinorSFTTrainer(
        model, args=train_args(tmp_path), train_dataset=prompt_completion_dataset(), processing_class=tokenizer
    )
    trainer.train()

    batch = whole_dataset_batch(trainer)
    initial_logps = fused_logps(initial.eval(), batch)
    torch.testing.assert_close(trainer.reference.token_logps(batch), initial_logps)
    assert not torch.allclose(fused_logps(trainer.model, batch), initial_logps, atol=1e-3)


# ---------------------------------------------------------------- 2. the cache key sees what the reference computes


def precompute_trainer(tmp_path, tokenizer, model=None, ref_model=None, peft_config=None, **overrides):
    return MinorSFTTrainer(
        model if model is not None else make_model(tokenizer),
        args=cpu_args(
            tmp_path / "out",
            **{"precompute_ref_log_probs": True, "ref_cache_dir": str(tmp_path / "cache"), "beta": BETA, **overrides},
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        ref_model=ref_model,
        peft_config=peft_config,
    )


class MaskFirstAnswerToken:
    """A custom collator that takes no loss on the first answer token of each row."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch["labels"]
        first = (labels != -100).int().argmax(dim=1)
        labels[torch.arange(labels.size(0)), first] = -100
        return batch


def retrained_lora(tokenizer, lora_alpha):
    model = get_peft_model(make_model(tokenizer), LoraConfig(r=4, lora_alpha=lora_alpha, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.2)
    return model


SAME_WEIGHTS_OTHER_REFERENCE = {
    "rms_norm_eps": lambda tok: dict(ref_model=make_model(tok, seed=1, rms_norm_eps=1e-2)),
    "hidden_act": lambda tok: dict(ref_model=make_model(tok, seed=1, hidden_act="gelu")),
    "attn_implementation": lambda tok: dict(ref_model=make_model(tok, seed=1, attn_implementation="eager")),
    "lora_alpha of the ref adapter": lambda tok: dict(model=retrained_lora(tok, lora_alpha=16)),
    "lora_alpha of a PEFT ref_model": lambda tok: dict(ref_model=retrained_lora(tok, lora_alpha=16)),
}
BASELINE = {
    "rms_norm_eps": lambda tok: dict(ref_model=make_model(tok, seed=1)),
    "hidden_act": lambda tok: dict(ref_model=make_model(tok, seed=1)),
    "attn_implementation": lambda tok: dict(ref_model=make_model(tok, seed=1, attn_implementation="sdpa")),
    "lora_alpha of the ref adapter": lambda tok: dict(model=retrained_lora(tok, lora_alpha=8)),
    "lora_alpha of a PEFT ref_model": lambda tok: dict(ref_model=retrained_lora(tok, lora_alpha=8)),
}


@pytest.mark.parametrize("change", SAME_WEIGHTS_OTHER_REFERENCE)
def test_a_reference_with_equal_weights_but_another_configuration_gets_its_own_cache_entry(
    tmp_path, tokenizer, count_reference_passes, change
):
    first = precompute_trainer(tmp_path, tokenizer, **BASELINE[change](tokenizer))
    second = precompute_trainer(tmp_path, tokenizer, **SAME_WEIGHTS_OTHER_REFERENCE[change](tokenizer))
    assert count_reference_passes == ["train", "train"]
    # Two keys, not one entry the second run rebuilt over the first's
    assert len(cache_entries(tmp_path / "cache")) == 2
    if change != "attn_implementation":  # eager and sdpa attention agree to float noise
        assert first.train_dataset["ref_logps"] != second.train_dataset["ref_logps"]


def cache_entries(cache_dir):
    return [entry for entry in cache_dir.iterdir() if entry.is_dir()]


# Adapters whose disabled base model is the same reference: other rank and targets, a trained copy of the LM head,
# trained rows of the embeddings
SAME_REFERENCE_ADAPTERS = {
    "other rank and targets": LoraConfig(r=8, target_modules=["k_proj", "o_proj"]),
    "modules_to_save": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "trainable_token_indices": LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
}


@pytest.mark.parametrize("adapter", SAME_REFERENCE_ADAPTERS)
def test_adapter_settings_that_leave_the_reference_alone_reuse_its_cache_entry(
    tmp_path, tokenizer, count_reference_passes, adapter
):
    first = precompute_trainer(tmp_path, tokenizer, peft_config=lora_config())
    second = MinorSFTTrainer(
        make_model(tokenizer),
        args=first.args,
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=SAME_REFERENCE_ADAPTERS[adapter],
    )
    assert count_reference_passes == ["train"]
    assert first.train_dataset["ref_logps"] == second.train_dataset["ref_logps"]


def test_a_custom_collator_that_masks_differently_gets_its_own_cache_entry(
    tmp_path, tokenizer, count_reference_passes
):
    first = precompute_trainer(tmp_path, tokenizer, peft_config=lora_config())
    second = MinorSFTTrainer(
        make_model(tokenizer),
        args=first.args,
        data_collator=MaskFirstAnswerToken(first.data_collator.collator),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert count_reference_passes == ["train", "train"]
    assert first.train_dataset["ref_logps"] != second.train_dataset["ref_logps"]


# ---------------------------------------------------------------- 3. the precision that really runs


@pytest.fixture
def launched_with_bf16_autocast(monkeypatch):
    """What `accelerate launch` with `mixed_precision: bf16` sets, while the training arguments say `bf16=False`."""
    AcceleratorState._reset_state(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precompute", [False, True], ids=["on the fly", "precomputed"])
def test_under_a_launcher_bf16_autocast_the_reference_runs_in_the_training_precision(
    tmp_path, tokenizer, launched_with_bf16_autocast, precompute
):
    trainer = precompute_trainer(
        tmp_path, tokenizer, peft_config=lora_config(), precompute_ref_log_probs=precompute, max_steps=1,
        per_device_train_batch_size=4,
    )  # fmt: skip
    assert trainer.accelerator.mixed_precision == "bf16" and not trainer.args.bf16
    trainer.train()
    # LoRA starts as the identity: the first step's policy equals its reference exactly, in any precision
    assert trainer.state.log_history[0]["deviation"] == 0.0
    if precompute:
        (manifest,) = (tmp_path / "cache").glob("*/manifest.json")
        assert '"autocast": "bf16"' in manifest.read_text()


# ---------------------------------------------------------------- 4. an SFTConfig does not silently train plain SFT


def test_an_sft_config_gives_minor_sft_and_says_so(tmp_path, tokenizer, warnings_of_minorsft):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1, learning_rate=3e-4),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.args, MinorSFTConfig)
    assert (trainer.args.loss_type, trainer.args.beta, trainer.args.learning_rate) == ("minor_sft", 0.04, 3e-4)
    assert any(re.search(r"got an `SFTConfig` \(loss_type='nll'.*training Minor SFT", m) for m in warnings_of_minorsft)


# ---------------------------------------------------------------- 6. full fine-tuning with a resized vocabulary


def test_full_fine_tuning_reference_is_the_policy_as_resized_by_a_chat_template(tmp_path, tiny_model_dir):
    # TRL's `clone_chat_template` adds the source's tokens and pads the vocabulary to a multiple of 64
    source = make_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|tool|>"]})
    source.save_pretrained(tmp_path / "template-source")
    tokenizer = make_tokenizer()
    trainer = MinorSFTTrainer(
        tiny_model_dir,
        args=train_args(tmp_path / "out", chat_template_path=str(tmp_path / "template-source")),
        train_dataset=conversational_dataset(),
        processing_class=tokenizer,
    )
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    assert vocab % 64 == 0 and vocab > 259
    assert trainer.ref_model.get_output_embeddings().weight.shape[0] == vocab
    batch = whole_dataset_batch(trainer)
    torch.testing.assert_close(trainer.reference.token_logps(batch), fused_logps(trainer.model.eval(), batch))
    trainer.train()
    assert trainer.state.log_history[0]["deviation"] == 0.0


# ---------------------------------------------------------------- 8. resuming another run's checkpoint


def checkpointed_run(tmp_path, tokenizer, seed=0, peft_config=None, dataset=None, **overrides):
    return MinorSFTTrainer(
        make_model(tokenizer, seed=seed),
        args=cpu_args(tmp_path / "out", **{
            "max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "steps", "save_steps": 1,
            "learning_rate": 1e-2, "beta": 0.04, **overrides,
        }),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config if peft_config is not None else lora_config(),
    )  # fmt: skip


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(seed=1), r"trained from other weights"),
        (dict(loss_type="sft_dpo"), r"trained with loss_type='minor_sft', this run has 'sft_dpo'"),
        (dict(beta=5.0), r"its loss settings differ \(beta=0.04 there, 5.0 here\)"),
        (dict(peft_config=LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
         r"its adapter differs \(r=4 there, 8 here\)"),
        (dict(dataset=prompt_completion_dataset().map(lambda row: {"completion": row["completion"] + "!"})),
         r"it was trained on other data"),
    ],
    ids=["other base model", "other loss type", "other beta", "other LoRA rank", "other data"],
)  # fmt: skip
def test_resuming_from_a_checkpoint_of_another_run_is_refused(tmp_path, tokenizer, other, message):
    checkpointed_run(tmp_path, tokenizer).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    with pytest.raises(ValueError, match=rf"belongs to another run: .*{message}.*Resume with the model, data and"):
        checkpointed_run(tmp_path, tokenizer, **{**other, "max_steps": 3}).train(resume_from_checkpoint=checkpoint)
    resumed = checkpointed_run(tmp_path, tokenizer, max_steps=3)
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == 3


def test_resuming_says_what_is_resumed(tmp_path, tokenizer, warnings_of_minorsft):
    checkpointed_run(tmp_path, tokenizer).train()
    checkpointed_run(tmp_path, tokenizer, max_steps=3).train(resume_from_checkpoint=True)
    assert any(
        re.search(r"Resuming from '.*checkpoint-2': the same loss \(minor_sft, beta=0.04\), model", message)
        for message in warnings_of_minorsft
    )


# ---------------------------------------------------------------- the reference self-check


def lora_trainer(tmp_path, tokenizer, peft_config=None, model=None, **overrides):
    return MinorSFTTrainer(
        model if model is not None else make_model(tokenizer),
        args=train_args(tmp_path, **overrides),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config if peft_config is not None else lora_config(),
    )


def fails_the_check(trainer):
    with pytest.raises(RuntimeError, match=r"Reference check failed: the reference is .* must give the policy's own"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast"])
def test_check_fires_when_disabling_the_adapters_does_not_give_the_starting_weights(
    tmp_path, tokenizer, request, precision
):
    # PiSSA moves the principal components of the base weights into the adapter: disabled, it is not the base model.
    # On the tiny random model the policy is off by only 0.02 nats per token, the float32 and the bf16 tolerance of a
    # check on the same batch catch that; a real model is off by nats (`benchmarks/reference_check_noise.py`)
    if precision == "bf16 autocast":
        request.getfixturevalue("launched_with_bf16_autocast")
    fails_the_check(
        lora_trainer(tmp_path, tokenizer, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    )


def test_check_fires_on_a_ref_adapter_that_is_not_the_adapter_being_retrained(tmp_path, tokenizer, monkeypatch):
    # The old IA3 / LoHa behaviour: a "ref" adapter added but none of the adapter's weights copied into it
    monkeypatch.setattr(
        reference_object, "add_reference_adapter", lambda model: model.add_adapter("ref", model.peft_config["default"])
    )
    trainer = MinorSFTTrainer(
        pretrained_adapter(tokenizer, "ia3"), args=train_args(tmp_path), train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    fails_the_check(trainer)


def test_check_fires_when_the_full_fine_tuning_copy_is_another_model(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(
        reference_object, "frozen_copy", lambda model: reference_module.freeze(make_model(tokenizer, seed=5))
    )
    trainer = MinorSFTTrainer(
        make_model(tokenizer), args=train_args(tmp_path), train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    fails_the_check(trainer)


def test_check_fires_when_precomputed_values_are_not_the_reference(tmp_path, tokenizer, monkeypatch):
    # Values of another reference under this run's key, past the cache's sample check
    original = ReferencePrecompute.compute_ref_logps

    def shifted(self, dataset, name, batch_size):
        computed = original(self, dataset, name, batch_size)
        return dataclasses.replace(computed, logps=computed.logps - 0.5)

    monkeypatch.setattr(ReferencePrecompute, "compute_ref_logps", shifted)
    fails_the_check(
        lora_trainer(tmp_path, tokenizer, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "c"))
    )


def test_a_cache_entry_that_disagrees_with_the_live_reference_is_rebuilt(
    tmp_path, tokenizer, count_reference_passes, warnings_of_minorsft
):
    import numpy as np

    from minorsft_trl.cache import MANIFEST, file_sha256

    first = precompute_trainer(tmp_path, tokenizer, peft_config=lora_config())
    (values_file,) = (tmp_path / "cache").glob("*/ref_logps.npy")
    np.save(values_file, np.load(values_file) - 0.5)
    # A consistent manifest: the damage is invisible to the file checks, only a live pass can see it
    manifest = values_file.parent / MANIFEST
    manifest.write_text(manifest.read_text().replace(
        re.search(r'"ref_logps.npy": "(\w+)"', manifest.read_text()).group(1), file_sha256(values_file)
    ))  # fmt: skip

    second = precompute_trainer(tmp_path, tokenizer, peft_config=lora_config())
    assert count_reference_passes == ["train", "train"]
    assert any("differ from a live reference pass" in m and "rebuilding" in m for m in warnings_of_minorsft)
    assert second.train_dataset["ref_logps"] == first.train_dataset["ref_logps"]


def test_an_explicit_reference_with_other_weights_is_reported_once_not_refused(
    tmp_path, tokenizer, warnings_of_minorsft
):
    trainer = MinorSFTTrainer(
        make_model(tokenizer), args=train_args(tmp_path), train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer, peft_config=lora_config(), ref_model=make_model(tokenizer, seed=7),
    )  # fmt: skip
    trainer.train()
    reports = [m for m in warnings_of_minorsft if "which the policy does not start from" in m]
    assert len(reports) == 1 and "the model given as `ref_model`" in reports[0]
    assert trainer.state.global_step == 4


def test_prompt_learning_starts_away_from_its_base_and_is_reported(tmp_path, tokenizer, warnings_of_minorsft):
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    lora_trainer(tmp_path, tokenizer, config).train()
    assert any(
        "PROMPT_TUNING adapters disabled, which the policy does not start from" in m for m in warnings_of_minorsft
    )
