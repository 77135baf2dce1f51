"""Results that say what they mean: the console's last block, the model card's names, the adapter's base model, and
metrics that are means over every example or token of what they summarise."""

import json
from pathlib import Path

import pytest
from peft import LoraConfig
from tiny import cpu_args, make_model, prompt_completion_dataset

from minorsft_trl import MinorSFTTrainer
from minorsft_trl.drift.card import console_summary
from minorsft_trl.drift.live import measures_at_start
from minorsft_trl.model_card import hub_id_of, name_saved_adapters_base_model, named_model_card

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
# The line TRL's template renders for a local model and a dataset name
TRL_LINE = (
    "This model is a fine-tuned version of [None](https://huggingface.co/None) on the "
    "[{d}](https://huggingface.co/datasets/{d}) dataset."
)


def trainer_with_eval(tmp_path, tokenizer, **overrides):
    args = cpu_args(
        tmp_path / "out", loss_type="minor_sft", precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "cache"),
        eval_strategy="steps", eval_steps=2, max_steps=2, per_device_eval_batch_size=3, learning_rate=5e-2,
        drift_num_prompts=4, drift_max_new_tokens=8, **overrides,
    )  # fmt: skip
    return MinorSFTTrainer(
        make_model(tokenizer),
        args=args,
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=LORA,
    )


def test_the_held_out_answer_nll_is_over_every_token_and_known_before_the_first_step(tmp_path, tokenizer):
    """8 eval answers of unequal lengths in batches of 3, 3 and 2: the mean over every answer token, not a mean of the
    three batch means; before the first step it is the precomputed reference's, which the policy equals."""
    trainer = trainer_with_eval(tmp_path, tokenizer)
    evaluated = trainer.evaluate()["eval_answer_nll"]
    # An independent total over the eval answers: the reference's log-probs summed, over their scored tokens
    before = trainer.drift.answer_nll_at_start()
    assert evaluated == pytest.approx(before, rel=1e-6)
    trainer.train()
    assert measures_at_start(trainer.state)["eval_answer_nll"] == pytest.approx(before, rel=1e-6)


def test_the_console_ends_with_the_drift_and_how_to_read_it():
    history = [
        {"step": 0, "eval_forward_kl": 0.0, "eval_nll_change": 0.0, "eval_answer_nll": 2.5},
        {"step": 10, "loss": 1.0},
        {"step": 20, "eval_forward_kl": 1.234, "eval_nll_change": -0.05, "eval_answer_nll": 0.75},
    ]
    summary = console_summary(history).splitlines()
    assert summary[0] == 'Drift from the reference, step 0 -> step 20 (README, "Is my run drifting?"):'
    assert summary[1].startswith("  forward KL on the reference's samples: 0 -> 1.234 nats/token (in this project's")
    assert "-0.05 nats/token (the general text got easier for the model than for its reference" in summary[2]
    assert summary[3].startswith("  held-out answer NLL: 2.5 -> 0.75 nats/token")
    started = [{"step": 0, "eval_forward_kl_sampled": 0.0}, {"step": 5, "eval_forward_kl_sampled": 0.3}]
    assert "(sampled-token estimate): 0 -> 0.3" in console_summary(started)
    assert console_summary([{"step": 1, "loss": 1.0}]) is None


def test_a_local_model_and_data_are_named_as_paths_and_a_hub_dataset_is_linked(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    card = (
        "---\nbase_model: None\nlibrary_name: transformers\n---\n\n# Model Card for out\n\n"
        + TRL_LINE.format(d="data.jsonl")
        + '\npipeline("text-generation", model="None")\n'
    )
    named = named_model_card(card, str(model), str(tmp_path / "data.jsonl"), "outputs/run")
    assert f"fine-tuned version of the local model `{model}` on `{tmp_path / 'data.jsonl'}`." in named
    assert "None" not in named and "huggingface.co" not in named and 'model="outputs/run"' in named
    hub = named_model_card(card, "Qwen/Qwen2-7B-Instruct", "trl-lib/Capybara", "out")
    assert "[Qwen/Qwen2-7B-Instruct](https://huggingface.co/Qwen/Qwen2-7B-Instruct) on the [trl-lib/Capybara]" in hub
    assert "base_model: Qwen/Qwen2-7B-Instruct" in hub
    assert named_model_card(card, "Qwen/Qwen2-7B-Instruct", "bigbench:unit_conversion", "o").count("`bigbench:") == 1


def test_the_embedded_model_is_named_by_its_hub_id_in_the_card_and_the_adapter(tmp_path, monkeypatch):
    import minorsft_trl.model_card as model_card

    converted = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    monkeypatch.setattr(model_card, "cache_root", lambda: tmp_path / "cache")
    assert hub_id_of(str(converted)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id_of(str(tmp_path)) is None and hub_id_of("org/model") == "org/model"

    saved = tmp_path / "run" / "checkpoint-5"
    saved.mkdir(parents=True)
    (saved / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(converted), "r": 4}))
    name_saved_adapters_base_model(str(tmp_path / "run"))
    adapter = json.loads((saved / "adapter_config.json").read_text())
    assert adapter == {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "r": 4}


def test_a_trained_run_card_names_no_none(tmp_path, tokenizer, tiny_model_dir):
    trainer = MinorSFTTrainer(
        tiny_model_dir,
        args=cpu_args(tmp_path / "run-7", loss_type="nll", max_steps=1),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=LORA,
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(dataset_name=str(tmp_path / "data.jsonl"))
    card = (tmp_path / "run-7" / "README.md").read_text()
    assert "# Model Card for run-7" in card and "None" not in card
    assert f"the local model `{tiny_model_dir}` on `{tmp_path / 'data.jsonl'}`" in card
    adapter = json.loads(Path(tmp_path / "run-7" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == tiny_model_dir
