"""Every SFTTrainer feature keeps working under the new losses, and TRL's own losses stay TRL's."""

import math
from dataclasses import fields

import pytest
import torch
from datasets import IterableDataset
from peft import IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig
from test_gradients import answer_logps, lora_config, one_step_gradients, step_args, whole_dataset_batch
from tiny import conversational_dataset, cpu_args, fused_logps, make_model, pristine, prompt_completion_dataset
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer

REFERENCE_METRICS = {"deviation", "log_ratio", "minor_weight", "minor_weight_min", "minor_weight_max"}


def lora_trainer(tmp_path, tokenizer, train_dataset, **overrides):
    return MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, max_steps=2, **overrides),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def assert_step_zero_loss_is_per_example_mean_nll(trainer):
    """At step 0 of LoRA the policy is its reference (w_i = 1): the loss is the mean over examples of each example's
    mean answer NLL, computed here from the full logits."""
    batch = whole_dataset_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        policy_logps, num_tokens = answer_logps(trainer.model, batch)
    torch.testing.assert_close(loss, (-policy_logps / num_tokens).mean())


def assert_trained_with_reference_metrics(trainer):
    first_log = trainer.state.log_history[0]
    assert REFERENCE_METRICS | {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= first_log.keys()
    assert math.isfinite(first_log["loss"]) and first_log["deviation"] == 0.0 and first_log["minor_weight"] == 1.0


def language_modeling_dataset():
    return prompt_completion_dataset().map(
        lambda e: {"text": e["prompt"] + e["completion"]}, remove_columns=["prompt", "completion"]
    )


@pytest.mark.parametrize(
    "dataset, overrides",
    [
        (prompt_completion_dataset(), {}),
        (conversational_dataset(), {"assistant_only_loss": True}),
        (language_modeling_dataset(), {}),
    ],
    ids=["prompt-completion, completion-only", "conversational, assistant-only", "language modeling"],
)
def test_data_formats_and_loss_masks(tmp_path, tokenizer, dataset, overrides):
    trainer = lora_trainer(tmp_path, tokenizer, dataset, **overrides)
    assert_step_zero_loss_is_per_example_mean_nll(trainer)
    trainer.train()
    assert_trained_with_reference_metrics(trainer)


def test_assistant_only_loss_counts_assistant_tokens_only(tmp_path, tokenizer):
    trainer = lora_trainer(tmp_path, tokenizer, conversational_dataset(), assistant_only_loss=True)
    labels = trainer.train_dataset[0]["labels"]
    answer = tokenizer.decode([t for t in labels if t != -100])
    assert answer == conversational_dataset()[0]["messages"][1]["content"] + "<|im_end|>"


def test_conversational_prompt_completion(tmp_path, tokenizer):
    dataset = conversational_dataset().map(
        lambda e: {"prompt": e["messages"][:1], "completion": e["messages"][1:]}, remove_columns="messages"
    )
    trainer = lora_trainer(tmp_path, tokenizer, dataset)
    assert_step_zero_loss_is_per_example_mean_nll(trainer)
    trainer.train()
    assert_trained_with_reference_metrics(trainer)


def test_streaming_dataset(tmp_path, tokenizer):
    rows = prompt_completion_dataset().to_list()
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    trainer = lora_trainer(tmp_path, tokenizer, dataset, per_device_train_batch_size=4)
    trainer.train()
    assert trainer.state.global_step == 2
    assert_trained_with_reference_metrics(trainer)


def test_eval_logs_loss_and_reference_metrics(tmp_path, tokenizer):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    metrics = trainer.evaluate()
    assert {f"eval_{k}" for k in REFERENCE_METRICS} <= metrics.keys()
    policy_logps, num_tokens = answer_logps(trainer.model, whole_dataset_batch(trainer))
    assert metrics["eval_loss"] == pytest.approx((-policy_logps / num_tokens).mean().item(), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tokenizer):
    def gradients(gradient_checkpointing):
        trainer = MinorSFTTrainer(
            make_model(tokenizer),
            args=step_args(tmp_path, gradient_checkpointing=gradient_checkpointing, beta=0.5),
            train_dataset=prompt_completion_dataset(),
            processing_class=tokenizer,
            ref_model=make_model(tokenizer, seed=1),
        )
        return one_step_gradients(trainer)

    with_checkpointing, without = gradients(True), gradients(False)
    for name, grad in without.items():
        torch.testing.assert_close(with_checkpointing[name], grad, msg=name)


def test_args_none_gives_a_minor_sft_config(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.args, MinorSFTConfig) and trainer.args.loss_type == "minor_sft"
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_plain_training_arguments_are_converted(tmp_path, tokenizer):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[], learning_rate=3e-4)
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=args,
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.args, MinorSFTConfig)
    assert (trainer.args.loss_type, trainer.args.learning_rate) == ("minor_sft", 3e-4)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("log_deviation", [False, True])
def test_trl_losses_are_unchanged(tmp_path, tokenizer, loss_type, log_deviation):
    """`nll` and `dft` train exactly as in SFTTrainer; `log_deviation` only adds the deviation metrics."""
    common = dict(max_steps=3, learning_rate=1e-2, per_device_train_batch_size=4, loss_type=loss_type)

    def run(trainer_cls, args):
        trainer = trainer_cls(
            make_model(tokenizer),
            args=args,
            train_dataset=prompt_completion_dataset(),
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return trainer, losses

    sft_fields = {f.name for f in fields(SFTConfig) if f.init}
    minor_args = cpu_args(tmp_path / "sft", **common)
    sft_args = SFTConfig(**{name: getattr(minor_args, name) for name in sft_fields})
    _, sft_losses = run(SFTTrainer, sft_args)
    minor, minor_losses = run(MinorSFTTrainer, cpu_args(tmp_path / "minor", log_deviation=log_deviation, **common))

    if log_deviation:
        # A run that reads its reference scores only the answer positions (`minorsft_trl.fused_head`): the same
        # per-token values by another path, equal here to the last bit, to float rounding on any CPU
        assert minor_losses == pytest.approx(sft_losses, rel=1e-6)
    else:
        assert minor_losses == sft_losses  # TRL's forward, exactly
    logged = minor.state.log_history[0].keys()
    assert ({"deviation", "log_ratio"} <= logged) == log_deviation
    assert "minor_weight" not in logged


def test_moe_load_balancing_loss_is_added_to_the_minor_sft_loss(tmp_path, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    def loss_and_aux(coef):
        torch.manual_seed(0)
        config = MixtralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            pad_token_id=tokenizer.pad_token_id,
        )
        trainer = MinorSFTTrainer(
            MixtralForCausalLM(config),
            args=cpu_args(tmp_path, router_aux_loss_coef=coef),
            train_dataset=prompt_completion_dataset(),
            processing_class=tokenizer,
            # Mixtral's experts are fused parameters, not `down_proj` layers (the target check refuses a name
            # that matches nothing)
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )
        batch = whole_dataset_batch(trainer)
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
            aux = trainer.model(**batch, output_router_logits=True, fused_lm_head=True).aux_loss
        return loss, aux

    loss_without, _ = loss_and_aux(0.0)
    loss_with, aux = loss_and_aux(0.5)
    assert aux > 0
    torch.testing.assert_close(loss_with - loss_without, 0.5 * aux)


@pytest.mark.parametrize(
    "peft_config",
    [
        lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        lambda: LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
        lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    ],
    ids=["IA3", "LoHa", "prompt tuning"],
)
def test_other_peft_types_train_against_their_disabled_adapters(tmp_path, tokenizer, tiny_model_dir, peft_config):
    trainer = MinorSFTTrainer(
        tiny_model_dir,
        args=cpu_args(tmp_path, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config(),
    )
    trainer.train()
    batch = whole_dataset_batch(trainer)
    # The reference is the base model, whatever the adapter adds (prompt tuning adds virtual tokens to the policy)
    torch.testing.assert_close(trainer.reference.token_logps(batch), fused_logps(pristine(tiny_model_dir), batch))
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(math.isfinite(log["loss"]) and "deviation" in log for log in logs)


def test_logged_reference_metrics_match_an_independent_computation(tmp_path, tokenizer):
    """Step 1's `deviation`, `log_ratio` and `minor_weight` (mean, min, max) come from the forward before the first
    update: recompute them from the full logits of the same model and reference."""
    reference = make_model(tokenizer, seed=1)
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, max_steps=1, beta=0.5),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        ref_model=reference,
    )
    batch = whole_dataset_batch(trainer)
    with torch.no_grad():
        policy_logps, num_tokens = answer_logps(trainer.model, batch)
        ref_logps, _ = answer_logps(reference, batch)
    log_ratio = policy_logps - ref_logps
    weight = 2 * torch.sigmoid(-0.5 * log_ratio)
    trainer.train()
    logged = trainer.state.log_history[0]
    expected = {
        "deviation": (log_ratio / num_tokens).mean(),
        "log_ratio": log_ratio.mean(),
        "minor_weight": weight.mean(),
        "minor_weight_min": weight.min(),
        "minor_weight_max": weight.max(),
    }
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key
    assert weight.max() - weight.min() > 0.05, "the test needs weights that differ"
