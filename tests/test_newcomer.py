"""What a new user trips on that is not a plain bad input: a run that would silently do something other than what was
asked (caps of another dataset, NaN weights, a LoRA target that matches nothing, a resumed run with other settings)."""

import re

import pytest
import torch
from test_gradients import lora_config
from tiny import cpu_args, make_model, make_tokenizer, prompt_completion_dataset, write_recipe
from transformers import AutoModelForCausalLM

from minorsft_trl import MinorSFTTrainer
from minorsft_trl.cli.train import parse_args
from minorsft_trl.data.sources import MinorSFTScriptArguments, load_datasets


def test_a_recipes_example_caps_do_not_cut_the_data_the_command_line_names(
    tmp_path, tiny_model_dir, warnings_of_minorsft
):
    """The packaged SmolLM2 recipe caps its BIG-bench demo at 400 questions: `--dataset_name data/big.jsonl` on the
    command line must train on all of the user's data, and say why the cap was dropped."""
    recipe = write_recipe(tmp_path, tiny_model_dir, max_train_examples=2, max_eval_examples=1)
    own = tmp_path / "own.jsonl"
    prompt_completion_dataset().to_json(own)

    script_args, *_ = parse_args(["--config", str(recipe), "--dataset_name", str(own)])
    assert (script_args.max_train_examples, script_args.max_eval_examples) == (None, None)
    assert any("max_train_examples=2 limits its own data" in message for message in warnings_of_minorsft)
    script_args, *_ = parse_args(["--config", str(recipe), f"--dataset_name={own}", "--max_train_examples", "3"])
    assert (script_args.max_train_examples, script_args.max_eval_examples) == (3, None)
    script_args, *_ = parse_args(["--config", str(recipe)])  # the recipe's own data: its caps apply
    assert (script_args.max_train_examples, script_args.max_eval_examples) == (2, 1)


def test_a_cap_that_leaves_examples_out_says_so(tmp_path, warnings_of_minorsft):
    own = tmp_path / "own.jsonl"
    prompt_completion_dataset().to_json(own)
    train, _ = load_datasets(MinorSFTScriptArguments(dataset_name=str(own), max_train_examples=3), evaluate=False)
    assert len(train) == 3
    assert "max_train_examples=3: using the first 3 of the 8 training examples." in warnings_of_minorsft


def nan_model(tokenizer):
    model = make_model(tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def nan_model_trainer(tmp_path, tokenizer, loss_type: str) -> MinorSFTTrainer:
    return MinorSFTTrainer(
        nan_model(tokenizer),
        args=cpu_args(tmp_path / "out", loss_type=loss_type, max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def test_a_model_with_nan_weights_stops_at_the_first_step_and_saves_nothing(tmp_path, tokenizer):
    trainer = nan_model_trainer(tmp_path, tokenizer, "minor_sft")
    with pytest.raises(
        RuntimeError, match=r"Reference check failed: .* is nan for one example: the policy or the reference gives"
    ):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "out").glob("checkpoint-*"))


def test_with_plain_sft_a_model_with_nan_weights_trains_on_as_sft_trainer_does_and_a_warning_says_why(
    tmp_path, tokenizer, warnings_of_minorsft
):
    trainer = nan_model_trainer(tmp_path, tokenizer, "nll")
    trainer.train()
    assert trainer.state.global_step == 2
    said = [message for message in warnings_of_minorsft if message.startswith("The training loss is")]
    assert len(said) == 1
    assert re.match(
        r"The training loss is nan at step 0: 1 weights hold NaN or inf \(e.g. the policy "
        r"'base_model.model.model.layers.0.mlp.down_proj.(base_layer.)?weight'\): the model was broken when loaded",
        said[0],
    )


def test_the_models_own_tokenizer_with_added_tokens_is_accepted(tmp_path, tokenizer, tiny_model_dir):
    """Only a tokenizer that maps the model's tokens to other ids is refused (see the bad-input table), not one that
    adds tokens for resized embeddings."""
    extended = make_tokenizer()
    extended.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(extended))
    MinorSFTTrainer(
        model,
        args=cpu_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset(),
        processing_class=extended,
    )
