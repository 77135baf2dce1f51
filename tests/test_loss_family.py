"""The loss family (`asft`, `sft_kl`, `iw_sft`): hand-computed values, the papers' gradients, the chunked KL against
the full softmax, and the trainer's gradients against independent computations from the full logits."""

import math
from dataclasses import fields

import pytest
import torch
from peft import LoraConfig
from test_gradients import (
    _perturb_lora,
    assert_same_grads,
    grads_of,
    one_step_gradients,
    step_args,
    whole_dataset_batch,
)
from tiny import (
    cpu_args,
    four_bit_config,
    fused_logps,
    make_model,
    pristine_in_training_kernels,
    prompt_completion_dataset,
)
from trl import SFTConfig, SFTTrainer

import minorsft_trl.reference.vocabulary_kl as vocabulary_kl
from minorsft_trl import MinorSFTTrainer
from minorsft_trl.losses import asft_loss, dft_token_loss, iw_sft_loss, iw_sft_weight, sft_kl_loss
from minorsft_trl.reference.vocabulary_kl import captured_hidden_states, token_kl

KL_COEF = 0.5


# ------------------------------------------------------------------ pure functions


def test_asft_loss_matches_hand_computed_values():
    token_logps = torch.log(torch.tensor([0.5, 0.25, 1.0]))
    kl = torch.tensor([0.2, 0.0, 1.5])
    expected = [-0.5 * math.log(0.5) + 0.1 * 0.2, -0.25 * math.log(0.25), 0.1 * 1.5]
    torch.testing.assert_close(asft_loss(token_logps, kl, 0.1), torch.tensor(expected))


def test_asft_gradient_is_dft_plus_lambda_times_kl_gradient():
    token_logps = torch.log(torch.tensor([0.5, 0.25, 0.9])).requires_grad_()
    kl = torch.tensor([0.2, 0.0, 1.5], requires_grad=True)
    grad_logps, grad_kl = torch.autograd.grad(asft_loss(token_logps, kl, KL_COEF).sum(), [token_logps, kl])
    # DFT: -p_t grad log p_t (the probability held constant); the anchor: lambda grad KL_t
    torch.testing.assert_close(grad_logps, -torch.tensor([0.5, 0.25, 0.9]))
    torch.testing.assert_close(grad_kl, torch.full((3,), KL_COEF))


def test_sft_kl_loss_matches_hand_computed_values_and_gradient():
    policy = torch.tensor([-6.0, -2.0], requires_grad=True)
    example_kl = torch.tensor([0.3, 0.0], requires_grad=True)
    num_tokens = torch.tensor([3.0, 1.0])
    loss = sft_kl_loss(policy, example_kl, num_tokens, KL_COEF)
    torch.testing.assert_close(loss, torch.tensor([(6.0 + 0.5 * 0.3) / 3, 2.0]))
    grad_policy, grad_kl = torch.autograd.grad(loss.sum(), [policy, example_kl])
    torch.testing.assert_close(grad_policy, torch.tensor([-1 / 3, -1.0]))
    torch.testing.assert_close(grad_kl, torch.tensor([KL_COEF / 3, KL_COEF]))


def test_iw_sft_weights_match_hand_computed_values():
    log_ratio = torch.tensor([-2.0, 0.0, 3.0, 2.0])
    num_tokens = torch.tensor([4.0, 2.0, 1.0, 1.0])
    # exp(r / m), clipped at 16: exp(3) = 20.1 is clipped, exp(2) = 7.39 is not
    expected = torch.tensor([math.exp(-0.5), 1.0, 16.0, math.exp(2.0)])
    torch.testing.assert_close(iw_sft_weight(log_ratio, num_tokens, 16.0), expected)


def test_iw_sft_gradient_is_the_detached_weight_times_the_nll_gradient():
    token_logps = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    example_ids = torch.tensor([0, 0, 1, 1])
    policy = torch.stack([token_logps[:2].sum(), token_logps[2:].sum()])
    ref = torch.tensor([-4.0, -1.5])
    num_tokens = torch.tensor([2.0, 2.0])
    loss = iw_sft_loss(token_logps, example_ids, policy, ref, num_tokens, 16.0)
    weight = torch.exp(torch.tensor([(-3.0 + 4.0) / 2, (-3.5 + 1.5) / 2]))
    torch.testing.assert_close(loss, weight[example_ids] * -token_logps.detach())
    (grad,) = torch.autograd.grad(loss.sum(), token_logps)
    # The weight is a constant: no gradient flows through the ratio inside it
    torch.testing.assert_close(grad, -weight[example_ids])


@pytest.mark.parametrize("log_ratio", [-5e4, 5e4])
def test_iw_sft_is_finite_for_extreme_log_ratios(log_ratio):
    token_logps = torch.tensor([log_ratio - 10.0], requires_grad=True)
    loss = iw_sft_loss(token_logps, torch.tensor([0]), token_logps, torch.tensor([-10.0]), torch.tensor([1.0]), 16.0)
    (grad,) = torch.autograd.grad(loss.sum(), token_logps)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert iw_sft_weight(torch.tensor([log_ratio]), torch.tensor([1.0]), 16.0).item() == (16.0 if log_ratio > 0 else 0)


def test_dft_token_loss_is_probability_weighted_nll():
    token_logps = torch.log(torch.tensor([0.5, 0.1]))
    torch.testing.assert_close(dft_token_loss(token_logps), torch.tensor([-0.5 * math.log(0.5), -0.1 * math.log(0.1)]))


# ------------------------------------------------------------------ the chunked KL


def _naive_kl(policy_hidden, policy_head, ref_hidden, ref_head):
    """`KL(pi_ref || pi_theta)` per row from the full `(T, vocab)` logits."""
    policy_logps = torch.nn.functional.linear(policy_hidden, *policy_head).log_softmax(-1)
    ref_logps = torch.nn.functional.linear(ref_hidden, *ref_head).log_softmax(-1)
    return (ref_logps.exp() * (ref_logps - policy_logps)).sum(-1)


@pytest.mark.parametrize("bias", [False, True], ids=["unbiased head", "biased head"])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["ordinary logits", "extreme logits"])
def test_token_kl_equals_the_full_softmax_kl_in_value_and_gradient(monkeypatch, bias, scale):
    monkeypatch.setattr(vocabulary_kl, "KL_TOKEN_CHUNK", 7)  # 30 tokens: several calls and a ragged last one
    generator = torch.Generator().manual_seed(0)
    vocab, hidden, tokens = 50, 8, 30
    weight = (torch.randn(vocab, hidden, generator=generator) * scale).requires_grad_()
    bias_ = torch.randn(vocab, generator=generator).requires_grad_() if bias else None
    policy_hidden = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    ref_head = (torch.randn(vocab, hidden, generator=generator) * scale, torch.randn(vocab) if bias else None)
    ref_hidden = torch.randn(tokens, hidden, generator=generator)

    got = token_kl(policy_hidden, (weight, bias_), ref_hidden, ref_head)
    expected = _naive_kl(policy_hidden, (weight, bias_), ref_hidden, ref_head)
    assert torch.isfinite(got).all() and (got >= -1e-4).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)
    leaves = [policy_hidden, weight] + ([bias_] if bias else [])
    for g, e in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), leaves), strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * scale)


def test_token_kl_of_a_model_with_itself_is_zero_with_zero_gradient():
    generator = torch.Generator().manual_seed(1)
    head = (torch.randn(50, 8, generator=generator).requires_grad_(), None)
    hidden = torch.randn(12, 8, generator=generator, requires_grad=True)
    kl = token_kl(hidden, head, hidden.detach(), head)
    torch.testing.assert_close(kl, torch.zeros(12), atol=1e-6, rtol=0)
    for grad in torch.autograd.grad(kl.sum(), [hidden, head[0]]):
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ the trainer, against independent computations


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)


def full_logits(model, batch):
    """`(batch, seq_len - 1, vocab)` log-softmax of the full logits and the `(batch, seq_len - 1)` answer mask: a path
    independent of TRL's fused LM head, the KL kernel and `ExampleIndex`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits.float().log_softmax(-1), batch["labels"][:, 1:] != -100


def reference_objective(loss_type, policy_logps_v, ref_logps_v, batch):
    """Each loss from the full log-softmax of policy and reference, written from its paper (see `losses.py`)."""
    labels = batch["labels"][:, 1:].clamp(min=0)[..., None]
    mask = batch["labels"][:, 1:] != -100
    token_logps = policy_logps_v.gather(-1, labels)[..., 0]
    token_kl = (ref_logps_v.exp() * (ref_logps_v - policy_logps_v)).sum(-1)
    if loss_type == "asft":
        per_token = -token_logps.detach().exp() * token_logps + KL_COEF * token_kl
        return (per_token * mask).sum() / mask.sum()
    num_tokens = mask.sum(1)
    policy = (token_logps * mask).sum(1)
    if loss_type == "sft_kl":
        return ((-policy + KL_COEF * (token_kl * mask).sum(1)) / num_tokens).mean()
    ref = (ref_logps_v.gather(-1, labels)[..., 0] * mask).sum(1)
    weight = torch.exp((policy.detach() - ref) / num_tokens).clamp(max=16.0)
    return (weight[:, None] * -token_logps * mask).sum() / mask.sum()


def _trainer(tmp_path, tokenizer, loss_type, architecture="llama", model=None, **kwargs):
    return MinorSFTTrainer(
        model if model is not None else make_model(tokenizer, architecture=architecture),
        args=step_args(tmp_path, loss_type=loss_type, kl_coef=KL_COEF),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        **kwargs,
    )


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("loss_type", ["asft", "sft_kl", "iw_sft"])
def test_lora_gradient_away_from_the_reference_equals_the_papers_objective(
    tmp_path, tokenizer, loss_type, architecture
):
    trainer = _trainer(tmp_path, tokenizer, loss_type, architecture, peft_config=lora_config())
    _perturb_lora(trainer.model)
    trainer.reference.check = None  # the policy is moved away from its reference on purpose
    batch = whole_dataset_batch(trainer)
    with torch.no_grad(), trainer.model.disable_adapter():
        ref_logps_v, _ = full_logits(trainer.model, batch)
    policy_logps_v, _ = full_logits(trainer.model, batch)
    objective = reference_objective(loss_type, policy_logps_v, ref_logps_v, batch)
    expected = grads_of(objective, trainer.model)
    assert_same_grads(one_step_gradients(trainer), expected)


@pytest.mark.parametrize("loss_type", ["asft", "sft_kl", "iw_sft"])
def test_full_fine_tuning_gradient_with_a_separate_reference_equals_the_papers_objective(
    tmp_path, tokenizer, loss_type
):
    """Full fine-tuning: the LM head, tied to the embeddings, gets the KL's gradient too (through the tied weight)."""
    reference = make_model(tokenizer, seed=1, tie_word_embeddings=True)
    policy = make_model(tokenizer, tie_word_embeddings=True)
    trainer = _trainer(tmp_path, tokenizer, loss_type, model=policy, ref_model=reference)
    for model in (trainer.model, reference):
        assert model.lm_head.weight is model.model.embed_tokens.weight, "the head must be tied"
    batch = whole_dataset_batch(trainer)
    with torch.no_grad():
        ref_logps_v, _ = full_logits(reference, batch)
    policy_logps_v, _ = full_logits(trainer.model, batch)
    expected = grads_of(reference_objective(loss_type, policy_logps_v, ref_logps_v, batch), trainer.model)
    assert_same_grads(one_step_gradients(trainer), expected)


def trl_gradients(tmp_path, tokenizer, loss_type, **kwargs):
    """One step of TRL's own `SFTTrainer`, the independent code path."""
    ours = step_args(tmp_path)
    args = SFTConfig(**{f.name: getattr(ours, f.name) for f in fields(SFTConfig) if f.init} | {"loss_type": loss_type})
    dataset = prompt_completion_dataset()
    trainer = SFTTrainer(make_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)
    return one_step_gradients(trainer)


@pytest.mark.parametrize(
    ("loss_type", "trl_loss_type"), [("asft", "dft"), ("iw_sft", "nll")], ids=["asft is dft", "iw_sft is nll"]
)
@pytest.mark.parametrize("reference", ["adapters disabled", "frozen copy"])
def test_where_the_policy_equals_its_reference_the_token_losses_are_trls(
    tmp_path, tokenizer, loss_type, trl_loss_type, reference
):
    """At the start the KL anchor is 0 with zero gradient (a large `kl_coef` would show any), and every iw-SFT weight
    is 1: `asft` trains exactly as TRL's `dft`, `iw_sft` as TRL's `nll`, loss and gradient."""
    kwargs = dict(peft_config=lora_config()) if reference == "adapters disabled" else {}
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=step_args(tmp_path / "ours", loss_type=loss_type, kl_coef=100.0),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        **kwargs,
    )
    ours = one_step_gradients(trainer)
    history = trainer.state.log_history[0]
    if loss_type == "asft":
        assert history["kl"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert history["iw_weight_min"] == pytest.approx(1.0) and history["iw_weight_max"] == pytest.approx(1.0)
    assert_same_grads(ours, trl_gradients(tmp_path / "trl", tokenizer, trl_loss_type, **kwargs), rtol=1e-5)


@pytest.mark.parametrize("reference", ["adapters disabled", "frozen copy"])
def test_where_the_policy_equals_its_reference_sft_kl_is_the_per_example_mean_nll(tmp_path, tokenizer, reference):
    kwargs = dict(peft_config=lora_config()) if reference == "adapters disabled" else {}
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=step_args(tmp_path, loss_type="sft_kl", kl_coef=100.0),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        **kwargs,
    )
    batch = whole_dataset_batch(trainer)
    policy_logps_v, mask = full_logits(trainer.model, batch)
    labels = batch["labels"][:, 1:].clamp(min=0)[..., None]
    token_logps = policy_logps_v.gather(-1, labels)[..., 0] * mask
    expected = grads_of((-token_logps.sum(1) / mask.sum(1)).mean(), trainer.model)
    assert_same_grads(one_step_gradients(trainer), expected)
    assert trainer.state.log_history[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_the_logged_metrics_are_those_of_the_batch(tmp_path, tokenizer):
    """`kl` is the mean per-token KL and `iw_weight(_min, _max)` the weights' mean and extremes, computed here from
    the full logits."""
    reference = make_model(tokenizer, seed=1)
    batch = None
    logged = {}
    for loss_type in ("sft_kl", "iw_sft"):
        trainer = _trainer(tmp_path / loss_type, tokenizer, loss_type, ref_model=reference)
        batch = whole_dataset_batch(trainer)
        one_step_gradients(trainer)
        logged.update(trainer.state.log_history[0])
    policy = make_model(tokenizer)
    with torch.no_grad():
        policy_logps_v, mask = full_logits(policy, batch)
        ref_logps_v, _ = full_logits(reference, batch)
    token_kl_ = (ref_logps_v.exp() * (ref_logps_v - policy_logps_v)).sum(-1)
    labels = batch["labels"][:, 1:].clamp(min=0)[..., None]
    log_ratio = ((policy_logps_v - ref_logps_v).gather(-1, labels)[..., 0] * mask).sum(1)
    weight = torch.exp(log_ratio / mask.sum(1)).clamp(max=16.0)
    assert logged["kl"] == pytest.approx(token_kl_[mask].mean().item(), rel=1e-4)
    assert logged["iw_weight"] == pytest.approx(weight.mean().item(), rel=1e-4)
    assert logged["iw_weight_min"] == pytest.approx(weight.min().item(), rel=1e-4)
    assert logged["iw_weight_max"] == pytest.approx(weight.max().item(), rel=1e-4)
    assert weight.max() - weight.min() > 0.1 and token_kl_[mask].mean() > 0.01, "the test needs a spread and a KL"


def test_iw_sft_with_precomputed_reference_equals_the_live_reference(tmp_path, tokenizer):
    def gradients(**overrides):
        trainer = MinorSFTTrainer(
            make_model(tokenizer),
            args=step_args(tmp_path, loss_type="iw_sft", ref_cache_dir=str(tmp_path / "cache"), **overrides),
            train_dataset=prompt_completion_dataset(),
            processing_class=tokenizer,
            ref_model=make_model(tokenizer, seed=1),
        )
        return one_step_gradients(trainer)

    assert_same_grads(gradients(precompute_ref_log_probs=True), gradients())


def test_the_training_curves_show_the_weights_and_the_kl_of_the_loss(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from minorsft_trl.drift.curves import plot_training_curves

    figures = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figures.append(subplots(*a, **k)) or figures[-1])
    logs = [
        {"step": 1, "loss": 2.0, "deviation": 0.0, "kl": 0.0, "iw_weight": 1.0, "iw_weight_min": 1.0,
         "iw_weight_max": 1.0},
        {"step": 2, "loss": 1.5, "deviation": 0.2, "kl": 0.01, "iw_weight": 1.1, "iw_weight_min": 0.9,
         "iw_weight_max": 1.4},
    ]  # fmt: skip
    path = plot_training_curves(logs, tmp_path / "curves.png")
    assert path.stat().st_size > 0
    titles = [axis.get_title() for axis in figures[0][1][0]]
    assert titles == [
        "loss", "deviation m_theta (eq. 8)", "importance weight min(exp(r/m), max)", "KL(π_ref ‖ π_θ) per answer token"
    ]  # fmt: skip


@pytest.mark.parametrize("loss_type", ["asft", "sft_kl"])
def test_qlora_kl_anchor_reads_a_pristine_4bit_base_through_training_and_evaluation(
    tmp_path, tokenizer, quantizable_model_dir, bnb_cpu_path, loss_type
):
    """The KL anchor's reference forward (hidden states and LM head) under QLoRA, on both bitsandbytes CPU paths,
    Llama and Qwen2 (biased q/k/v): 0 at the first step, and after training with evaluations in between it still
    reads the 4-bit base as loaded."""
    trainer = MinorSFTTrainer(
        quantizable_model_dir,
        args=cpu_args(
            tmp_path, loss_type=loss_type, max_steps=4, learning_rate=5e-2, per_device_train_batch_size=4,
            eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
        ),
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset(4),
        processing_class=tokenizer,
        peft_config=lora_config(),
        quantization_config=four_bit_config(),
    )  # fmt: skip
    trainer.train()
    kls = [log["kl"] for log in trainer.state.log_history if "kl" in log and "loss" in log]
    assert len(kls) == 4 and all(map(math.isfinite, kls))
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-4

    batch = whole_dataset_batch(trainer)
    base = pristine_in_training_kernels(quantizable_model_dir, quantization_config=four_bit_config())
    token_logps, hidden_states, head = trainer.reference.token_logps(batch, hidden_states=True)
    torch.testing.assert_close(token_logps, fused_logps(base, batch), rtol=0, atol=0)
    with captured_hidden_states(base) as captured, torch.no_grad():
        base(**batch, use_cache=False, fused_lm_head=True)
    torch.testing.assert_close(hidden_states, captured[-1], rtol=0, atol=0)
    torch.testing.assert_close(head[0], base.get_output_embeddings().weight, rtol=0, atol=0)
