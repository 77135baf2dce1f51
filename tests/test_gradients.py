"""The trainer's gradients against independent computations, and their invariance to how a step is batched."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from tiny import cpu_args, make_model, prompt_completion_dataset
from transformers import TrainerCallback

from minorsft_trl import MinorSFTTrainer

BETA = 0.5


class GradientRecorder(TrainerCallback):
    """Keeps the gradients of the trainable parameters just before the (single) optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_step_gradients(trainer: MinorSFTTrainer) -> dict[str, torch.Tensor]:
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    return recorder.grads


def step_args(tmp_path, **overrides):
    """One SGD step without clipping: the recorded gradients are exactly those of the loss."""
    return cpu_args(tmp_path, max_steps=1, optim="sgd", learning_rate=0.1, max_grad_norm=0.0, **overrides)


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def answer_logps(model, batch):
    """`(N,)` summed answer log-probs and `(N,)` answer lengths of a padded batch, from the full logits: a code path
    independent of TRL's fused LM head and of `ExampleIndex`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token_logps * mask).sum(1), mask.sum(1).float()


def whole_dataset_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def grads_of(loss, model):
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def assert_same_grads(got, expected, rtol=1e-4, atol=1e-6):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_step_zero_lora_gradient_equals_per_example_mean_nll_gradient(tmp_path, tokenizer):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=step_args(tmp_path, beta=BETA),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    policy_logps, num_tokens = answer_logps(trainer.model, whole_dataset_batch(trainer))
    expected = grads_of((-policy_logps / num_tokens).mean(), trainer.model)
    assert any(g.abs().sum() > 0 for g in expected.values())

    assert_same_grads(one_step_gradients(trainer), expected)


def _perturb_lora(model, seed=0):
    """Move the LoRA B matrices away from zero, so the policy differs from its adapter-disabled reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 2.0)


def closed_form_loss(loss_type, policy_logps, ref_logps, num_tokens):
    """The paper's objectives in closed form: eq. 7 integrated (minor_sft) and eq. 3 (sft_dpo), mean over examples."""
    log_ratio = policy_logps - ref_logps
    if loss_type == "minor_sft":
        return (-(2 / (BETA * num_tokens)) * F.logsigmoid(BETA * log_ratio)).mean()
    return (-F.logsigmoid(BETA * log_ratio)).mean()


@pytest.mark.parametrize("loss_type", ["minor_sft", "sft_dpo"])
def test_lora_gradient_equals_closed_form_with_adapter_disabled_reference(tmp_path, tokenizer, loss_type):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=step_args(tmp_path, loss_type=loss_type, beta=BETA),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    _perturb_lora(trainer.model)
    trainer.reference.check = None  # the policy is moved away from its reference on purpose
    batch = whole_dataset_batch(trainer)
    with torch.no_grad(), trainer.model.disable_adapter():
        ref_logps, _ = answer_logps(trainer.model, batch)
    policy_logps, num_tokens = answer_logps(trainer.model, batch)
    log_ratio = policy_logps.detach() - ref_logps
    assert (BETA * log_ratio).abs().max() > 0.2, "the test needs weights away from 1"
    expected = grads_of(closed_form_loss(loss_type, policy_logps, ref_logps, num_tokens), trainer.model)

    assert_same_grads(one_step_gradients(trainer), expected)


@pytest.mark.parametrize("loss_type", ["minor_sft", "sft_dpo"])
def test_full_fine_tuning_gradient_equals_closed_form_with_separate_reference(tmp_path, tokenizer, loss_type):
    reference = make_model(tokenizer, seed=1)
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=step_args(tmp_path, loss_type=loss_type, beta=BETA),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        ref_model=reference,
    )
    batch = whole_dataset_batch(trainer)
    with torch.no_grad():
        ref_logps, _ = answer_logps(reference, batch)
    policy_logps, num_tokens = answer_logps(trainer.model, batch)
    expected = grads_of(closed_form_loss(loss_type, policy_logps, ref_logps, num_tokens), trainer.model)

    assert_same_grads(one_step_gradients(trainer), expected)


BATCHINGS = {
    "batch 4 x accumulation 2": dict(per_device_train_batch_size=4, gradient_accumulation_steps=2),
    "batch 2 x accumulation 4": dict(per_device_train_batch_size=2, gradient_accumulation_steps=4),
    "padding-free": dict(padding_free=True, max_length=None),
    "packed (bfd)": dict(packing=True, max_length=64),
    # Unequal micro-batches (3 + 3 + 2 examples; packed rows of different example counts): a per-micro-batch mean
    # would weigh the examples of the small ones more
    "batch 3 x accumulation 3": dict(per_device_train_batch_size=3, gradient_accumulation_steps=3),
    "packed rows one by one": dict(
        packing=True, max_length=64, per_device_train_batch_size=1, gradient_accumulation_steps=8
    ),
}


@pytest.mark.parametrize("loss_type", ["minor_sft", "sft_dpo", "asft", "sft_kl", "iw_sft"])
@pytest.mark.parametrize("batching", BATCHINGS)
def test_normalisation_survives_batching(tmp_path, tokenizer, loss_type, batching):
    """One optimizer step over the same 8 examples gives the same gradient (float32, rtol 1e-4) whether they come
    as one batch of 8, as micro-batches with gradient accumulation, or flattened/packed into rows: per example
    (`minor_sft`, `sft_dpo`, `sft_kl`) or per token (`asft`, `iw_sft`), the mean is over the whole step."""

    def gradients(**overrides):
        trainer = MinorSFTTrainer(
            make_model(tokenizer),
            args=step_args(tmp_path, loss_type=loss_type, beta=BETA, kl_coef=0.5, **overrides),
            train_dataset=prompt_completion_dataset(),
            processing_class=tokenizer,
            ref_model=make_model(tokenizer, seed=1),  # far from the policy: weights far from 1, KL far from 0
        )
        return one_step_gradients(trainer)

    assert_same_grads(gradients(**BATCHINGS[batching]), gradients(per_device_train_batch_size=8))


def test_examples_without_answer_tokens_are_left_out_of_the_mean(tmp_path, tokenizer):
    ids = [tokenizer(text).input_ids for text in ("2+2= 4", "3*3= 9", "sky? blue")]
    labels = [[-100] * 5 + ids[0][5:], [-100] * len(ids[1]), [-100] * 5 + ids[2][5:]]
    dataset = prompt_completion_dataset(3).from_dict({"input_ids": ids, "labels": labels})
    reference = make_model(tokenizer, seed=1)
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=step_args(tmp_path, beta=BETA, max_length=None),
        train_dataset=dataset,
        processing_class=tokenizer,
        ref_model=reference,
    )
    batch = whole_dataset_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.isfinite(loss)

    keep = torch.tensor([0, 2])
    with torch.no_grad():
        ref_logps, _ = answer_logps(reference, batch)
        policy_logps, num_tokens = answer_logps(trainer.model, batch)
    weight = 2 * torch.sigmoid(-BETA * (policy_logps - ref_logps))
    expected = (weight * -policy_logps / num_tokens)[keep].mean()
    torch.testing.assert_close(loss.detach(), expected)
