"""Bad input is refused before training starts, with an error that names the value and the fix."""

import math

import pytest
from test_gradients import lora_config
from test_reference import four_bit_config
from tiny import cpu_args, make_model, prompt_completion_dataset
from transformers import AutoModelForCausalLM

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": "minor-sft"}, r"loss_type must be one of .*'minor_sft'.*got 'minor-sft'"),
        ({"beta": 0.0}, r"beta must be a finite number > 0, got 0.0"),
        ({"beta": -0.1}, r"beta must be a finite number > 0, got -0.1"),
        ({"beta": math.nan}, r"beta must be a finite number > 0, got nan"),
        ({"beta": math.inf}, r"beta must be a finite number > 0, got inf"),
        ({"beta": "0.04"}, r"beta must be a number > 0, got '0.04' \(str\)"),
    ],
)
def test_bad_config_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        MinorSFTConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def build(tmp_path, tokenizer, model=None, dataset=None, args=None, **kwargs):
    return MinorSFTTrainer(
        model if model is not None else make_model(tokenizer),
        args=args or cpu_args(tmp_path, max_steps=1),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(),
        processing_class=tokenizer,
        **kwargs,
    )


def test_reference_with_another_vocabulary(tmp_path, tokenizer):
    other_vocab = make_model(tokenizer, vocab_size=len(tokenizer) + 8)
    with pytest.raises(ValueError, match=r"vocabulary of 267 tokens but the policy has 259.*leave `ref_model` unset"):
        build(tmp_path, tokenizer, ref_model=other_vocab, peft_config=lora_config())


def test_all_answers_lost_to_truncation(tmp_path, tokenizer):
    long_prompts = prompt_completion_dataset().map(lambda e: {"prompt": e["prompt"] * 10})
    with pytest.raises(ValueError, match=r"All 8 training examples lost their answer tokens.*max_length=16.*Raise"):
        build(tmp_path, tokenizer, dataset=long_prompts, args=cpu_args(tmp_path, max_length=16))


def test_empty_dataset(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="`train_dataset` is empty"):
        build(tmp_path, tokenizer, dataset=prompt_completion_dataset().select([]))


def test_quantized_model_path_without_peft(tmp_path, tokenizer, tiny_model_dir):
    with pytest.raises(ValueError, match=r"quantized .* no `peft_config`.*Pass a `peft_config`"):
        build(tmp_path, tokenizer, model=tiny_model_dir, quantization_config=four_bit_config())


def test_quantized_model_instance_without_peft(tmp_path, tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=four_bit_config())
    with pytest.raises(ValueError, match=r"quantized .* no `peft_config`"):
        build(tmp_path, tokenizer, model=model)


def test_full_fine_tuning_of_a_model_without_a_path(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"needs a reference model.*Pass `ref_model=...`"):
        build(tmp_path, tokenizer)


def test_reference_set_twice(tmp_path, tokenizer, tiny_model_dir):
    args = cpu_args(tmp_path, ref_model_name_or_path=tiny_model_dir)
    with pytest.raises(ValueError, match="Both `ref_model` and `ref_model_name_or_path"):
        build(tmp_path, tokenizer, args=args, ref_model=tiny_model_dir, peft_config=lora_config())


def test_policy_as_its_own_reference(tmp_path, tokenizer):
    model = make_model(tokenizer)
    with pytest.raises(ValueError, match="`ref_model` is the model being trained"):
        build(tmp_path, tokenizer, model=model, ref_model=model)


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        ({"packing": True, "packing_strategy": "wrapped"}, {}, "packing_strategy='wrapped' cuts examples"),
        ({"label_smoothing_factor": 0.1}, {}, r"label_smoothing_factor=0.1 is not supported.*Set"),
        ({}, {"compute_loss_func": lambda *a, **k: 0}, "`compute_loss_func` replaces the loss"),
    ],
)
def test_options_that_contradict_a_per_example_loss(tmp_path, tokenizer, overrides, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, tokenizer, args=cpu_args(tmp_path, **overrides), peft_config=lora_config(), **kwargs)


def test_precompute_on_a_streaming_dataset(tmp_path, tokenizer):
    from datasets import IterableDataset

    rows = prompt_completion_dataset().to_list()
    streaming = IterableDataset.from_generator(lambda: iter(rows))
    args = cpu_args(tmp_path, precompute_ref_log_probs=True, max_steps=1)
    with pytest.raises(ValueError, match=r"precompute_ref_log_probs=True needs map-style datasets.*streaming"):
        build(tmp_path, tokenizer, dataset=streaming, args=args, peft_config=lora_config())


def test_precompute_without_a_reference(tmp_path):
    with pytest.raises(ValueError, match="no reference to precompute"):
        MinorSFTConfig(output_dir=str(tmp_path), use_cpu=True, loss_type="nll", precompute_ref_log_probs=True)
