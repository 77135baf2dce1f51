"""Where the reference comes from, that it stays frozen, and that the reference pass leaves the policy untouched."""

import copy
import math
from dataclasses import replace

import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from test_gradients import lora_config, whole_dataset_batch
from tiny import (
    cpu_args,
    four_bit_config,
    fused_logps,
    make_model,
    pristine,
    pristine_in_training_kernels,
    prompt_completion_dataset,
)
from trl.trainer.utils import add_fused_lm_head

from minorsft_trl import MinorSFTTrainer
from minorsft_trl.drift.live import drift_log_history


def train_args(tmp_path, **overrides):
    """A few steps at a high learning rate, so the policy moves visibly away from where it started."""
    return cpu_args(tmp_path, max_steps=4, learning_rate=5e-2, per_device_train_batch_size=4, **overrides)


# PEFT's `bias` option trains the base model's own biases, which disabling the adapters does not undo
BIASES = ["none", "all", "lora_only"]


@pytest.mark.parametrize("bias", BIASES)
def test_adapter_disabled_reference_equals_a_pristine_base_after_training(
    tmp_path, tokenizer, quantizable_model_dir, bias
):
    trainer = MinorSFTTrainer(
        quantizable_model_dir,
        args=train_args(tmp_path),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=replace(lora_config(), bias=bias),
    )
    trained_biases = [n for n, p in trainer.model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    if bias != "none" and "qwen2" in quantizable_model_dir:
        assert trained_biases, "the test must train the base model's biases"
    trainer.train()
    batch = whole_dataset_batch(trainer)
    base_logps = fused_logps(pristine(quantizable_model_dir), batch)

    torch.testing.assert_close(trainer.reference.token_logps(batch), base_logps, rtol=0, atol=0)
    # The policy did move, and the reference pass reads the policy's own (single) copy of the base weights
    assert not torch.allclose(fused_logps(trainer.model, batch), base_logps, atol=1e-3)
    assert trainer.ref_model is None


def test_the_kl_anchors_reference_head_keeps_its_starting_bias_while_the_adapter_trains_it(tmp_path, tokenizer):
    """`bias="all"` trains the LM head's own bias: the reference's head, read for the KL anchor inside the reference
    pass (where the starting bias is swapped in), must still hold the starting bias when the kernel uses it after."""
    model = make_model(tokenizer)
    model.lm_head.bias = torch.nn.Parameter(0.1 * torch.randn(model.config.vocab_size))
    starting_bias = model.lm_head.bias.detach().clone()
    trainer = MinorSFTTrainer(
        model,
        args=train_args(tmp_path, loss_type="sft_kl", kl_coef=1.0),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=replace(lora_config(), bias="all"),
    )
    trainer.train()
    _, _, (_, ref_bias) = trainer.reference.token_logps(whole_dataset_batch(trainer), hidden_states=True)
    assert not torch.allclose(trainer.model.base_model.model.lm_head.bias, starting_bias), "the bias must train"
    torch.testing.assert_close(ref_bias, starting_bias, rtol=0, atol=0)


def test_qlora_reference_equals_a_pristine_4bit_base_after_training_and_evaluation(
    tmp_path, tokenizer, quantizable_model_dir, bnb_cpu_path
):
    trainer = MinorSFTTrainer(
        quantizable_model_dir,
        args=train_args(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(4),
        processing_class=tokenizer,
        peft_config=lora_config(),
        quantization_config=four_bit_config(),
    )
    trainer.train()  # evaluation between training steps: eval-mode no-grad forwards, then training again
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert trainer.state.global_step == 4 and len(losses) == 4 and all(map(math.isfinite, losses))
    assert [log for log in trainer.state.log_history if "loss" in log][0]["deviation"] == 0.0
    # The drift measures ran too (on by default with an eval split): sampling and scoring with the 4-bit reference
    drift = [log["eval_forward_kl"] for log in drift_log_history(trainer.state) if "eval_forward_kl" in log]
    assert len(drift) == 3 and drift[0] == 0.0 and drift[-1] > 0

    batch = whole_dataset_batch(trainer)
    base = pristine_in_training_kernels(quantizable_model_dir, quantization_config=four_bit_config())
    torch.testing.assert_close(trainer.reference.token_logps(batch), fused_logps(base, batch), rtol=0, atol=0)
    # No 4-bit weight was repacked into bitsandbytes' inference-only CPU format by training, evaluation or the
    # reference passes
    assert not any(
        getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        for module in trainer.model.modules()
        if isinstance(module, bnb_modules.Linear4bit)
    )
    assert not torch.allclose(fused_logps(trainer.model.train(), batch), fused_logps(base, batch), atol=1e-3)


def test_qlora_of_a_float32_model_with_a_trained_head_copy_passes_the_start_check(
    tmp_path, tokenizer, quantizable_model_dir
):
    """What TRL sets up by itself when `chat_template_path` adds tokens: `modules_to_save=["lm_head"]`, whose trained
    copy TRL casts to bfloat16 under QLoRA, while the reference (adapters disabled) runs the float32 head."""
    trainer = MinorSFTTrainer(
        quantizable_model_dir,
        args=cpu_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=replace(lora_config(), modules_to_save=["lm_head"]),
        quantization_config=four_bit_config(),
    )
    head_copy = trainer.model.base_model.model.lm_head.modules_to_save["default"].weight
    assert (
        head_copy.dtype == torch.bfloat16
        and trainer.model.base_model.model.lm_head.original_module.weight.dtype == torch.float32
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_reference_pass_restores_adapters_and_train_mode_even_when_the_forward_raises(tmp_path, tokenizer):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=train_args(tmp_path),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    model = trainer.model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.3)
    model.train()
    batch = whole_dataset_batch(trainer)
    before = fused_logps(model, batch)

    def fail(*_):
        raise RuntimeError("forward failed")

    hook = model.get_input_embeddings().register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="forward failed"):
        trainer.reference.token_logps(batch)
    hook.remove()

    assert model.training
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and not any(layer.disable_adapters for layer in lora_layers)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    torch.testing.assert_close(fused_logps(model, batch), before, rtol=0, atol=0)


def test_policy_log_probs_are_bit_identical_with_and_without_a_reference_pass(tmp_path, tokenizer):
    config = lora_config()
    config.lora_dropout = 0.2
    trainer = MinorSFTTrainer(
        make_model(tokenizer, attention_dropout=0.2),
        args=train_args(tmp_path, disable_dropout=False),  # the reference pass must not move the RNG either way
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=config,
    )
    model = trainer.model
    model.train()
    batch = whole_dataset_batch(trainer)

    def policy_logps(seed, with_reference_pass):
        torch.manual_seed(seed)
        if with_reference_pass:
            trainer.reference.token_logps(batch)
        return model(**batch, use_cache=False, fused_lm_head=True).log_probs.detach()

    without = policy_logps(0, with_reference_pass=False)
    assert not torch.equal(without, policy_logps(1, with_reference_pass=False)), "dropout must be active"
    assert torch.equal(policy_logps(0, with_reference_pass=True), without)


@pytest.mark.parametrize("bias", BIASES)
def test_retrained_adapter_is_compared_with_a_frozen_copy_of_itself(tmp_path, tokenizer, bias):
    model = get_peft_model(make_model(tokenizer, architecture="qwen2"), replace(lora_config(), bias=bias))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a "pretrained" adapter, not the base model
    initial = copy.deepcopy(model)  # taken before the trainer patches the forward
    add_fused_lm_head(initial.get_base_model())

    trainer = MinorSFTTrainer(
        model, args=train_args(tmp_path), train_dataset=prompt_completion_dataset(), processing_class=tokenizer
    )
    assert "ref" in trainer.model.peft_config
    ref_params = [p for n, p in trainer.model.named_parameters() if ".ref." in n]
    assert ref_params and not any(p.requires_grad for p in ref_params)
    trainer.train()

    batch = whole_dataset_batch(trainer)
    initial_logps = fused_logps(initial.eval(), batch)
    torch.testing.assert_close(trainer.reference.token_logps(batch), initial_logps)
    assert not torch.allclose(fused_logps(trainer.model, batch), initial_logps, atol=1e-3)
    assert trainer.model.active_adapter == "default"


def test_full_fine_tuning_reference_is_a_frozen_copy_loaded_from_the_policy_path(tmp_path, tokenizer, tiny_model_dir):
    trainer = MinorSFTTrainer(
        tiny_model_dir,
        args=train_args(tmp_path),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
    )
    reference = trainer.ref_model
    assert reference is not None and reference is not trainer.model
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    trainer.train()

    batch = whole_dataset_batch(trainer)
    base_logps = fused_logps(pristine(tiny_model_dir), batch)
    torch.testing.assert_close(trainer.reference.token_logps(batch), base_logps, rtol=0, atol=0)
    assert not torch.allclose(fused_logps(trainer.model, batch), base_logps, atol=1e-3)


@pytest.mark.parametrize("as_path", [True, False], ids=["path", "model"])
def test_explicit_reference_is_used_as_given(tmp_path, tokenizer, tiny_model_dir, as_path):
    ref_model = tiny_model_dir if as_path else pristine(tiny_model_dir)
    trainer = MinorSFTTrainer(
        make_model(tokenizer, seed=3),
        args=train_args(tmp_path),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
        ref_model=ref_model,
    )
    batch = whole_dataset_batch(trainer)
    torch.testing.assert_close(
        trainer.reference.token_logps(batch), fused_logps(pristine(tiny_model_dir), batch), rtol=0, atol=0
    )
