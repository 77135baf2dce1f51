"""The KL anchor of `sft_kl` and `asft` precomputed as the reference's top-k per answer token and draws from the rest:
with k = the vocabulary the exact anchor's gradients with no reference forward, under every batch layout; with a small
k and no draws the coarsening computed by hand from both models' full distributions, with draws the full KL; a cache
keyed by k and the draws; bad settings refused before training."""

from types import SimpleNamespace

import pytest
import torch
from test_gradients import lora_config, one_step_gradients, step_args
from tiny import cpu_args, make_model, prompt_completion_dataset

from minorsft_trl import MinorSFTConfig, MinorSFTTrainer
from minorsft_trl.errors import InputError
from minorsft_trl.reference import precompute, topk_cache

KL_COEF = 100.0  # the anchor outweighs the NLL: a wrong anchor shows in every gradient


def build(tmp_path, tokenizer, loss_type="sft_kl", ref_seed=1, args_fn=step_args, dataset=None, **overrides):
    """The tiny policy against a reference of other random weights (the anchor is at work from the first step), or
    with `ref_seed=None` a LoRA policy whose reference is its base."""
    overrides.setdefault("ref_cache_dir", str(tmp_path / "ref-cache"))
    reference = {"ref_model": make_model(tokenizer, seed=ref_seed)} if ref_seed is not None else {}
    return MinorSFTTrainer(
        make_model(tokenizer),
        args=args_fn(tmp_path / "out", loss_type=loss_type, kl_coef=KL_COEF, **overrides),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config() if ref_seed is None else None,
        **reference,
    )


def no_reference_forward(*args, **kwargs):
    raise AssertionError("a reference forward ran although the anchor was precomputed")


ACCUMULATE = {"gradient_accumulation_steps": 3, "per_device_train_batch_size": 3}  # 3 + 3 + 2 examples


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(packing=True),
        dict(padding_free=True, max_length=None, per_device_train_batch_size=4, gradient_accumulation_steps=2),
        ACCUMULATE,
    ],
    ids=["padded", "packed", "padding-free, accumulation", "accumulation 3 + 3 + 2"],
)
@pytest.mark.parametrize("loss_type", ["sft_kl", "asft"])
def test_with_k_the_vocabulary_the_precomputed_anchor_has_the_exact_anchors_gradients(
    tmp_path, tokenizer, loss_type, setting
):
    def gradients(precompute: bool):
        trainer = build(
            tmp_path, tokenizer, loss_type, precompute_ref_log_probs=precompute, ref_top_k=len(tokenizer), **setting
        )
        if precompute:
            assert trainer.ref_model is None, "precompute_ref_log_probs=True releases the separate reference"
            trainer.reference.token_logps = no_reference_forward
        grads = one_step_gradients(trainer)
        (log,) = [log for log in trainer.state.log_history if "loss" in log]
        return grads, log

    (exact, exact_log), (precomputed, precomputed_log) = gradients(False), gradients(True)
    assert precomputed_log["kl_top_k"] == len(tokenizer) and "kl_top_k" not in exact_log
    assert precomputed_log["kl"] == pytest.approx(exact_log["kl"], rel=1e-5) and exact_log["kl"] > 0.01
    for name, grad in exact.items():
        error = ((precomputed[name] - grad).norm() / grad.norm()).item()
        # float32 noise, in `q - p` of two models both near uniform
        assert error < 1e-4, f"{name}: the gradient is off by {error:.3g} of its norm"


def brute_force_kl(policy, reference, trainer, k: int | None) -> float:
    """The mean per answer token of `KL(pi_ref || pi_theta)` over the training data, from both models' full logits,
    coarsened by hand to the reference's top `k` and the rest (`None`: not coarsened)."""
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        p, q = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
            .double().softmax(-1)
            for model in (reference, policy)
        )  # fmt: skip
    if k is not None:
        ids = p.topk(k, dim=-1).indices
        p_kept, q_kept = p.gather(-1, ids), q.gather(-1, ids)
        p = torch.cat([p_kept, 1 - p_kept.sum(-1, keepdim=True)], -1)
        q = torch.cat([q_kept, 1 - q_kept.sum(-1, keepdim=True)], -1)
    return (p * (p.log() - q.log())).sum(-1).mean().item()


@pytest.mark.parametrize(
    ("draws", "expected", "rel"),
    # Without draws, the coarsening to 3 tokens and the rest: a sixteenth of the full KL here. With 2000, the draws'
    # noise averages out over the batch's tokens: 1.2% off the full KL (its expectation: `test_topk_anchor`)
    [(0, "coarsened", 1e-5), (2000, "full", 0.03)],
    ids=["no draws: the coarsened KL", "draws: the full KL"],
)
def test_with_a_small_k_the_anchor_is_the_coarsened_kl_or_with_draws_the_full_one(
    tmp_path, tokenizer, draws, expected, rel
):
    trainer = build(tmp_path, tokenizer, precompute_ref_log_probs=True, ref_top_k=3, ref_tail_samples=draws)
    reference = make_model(tokenizer, seed=1)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    kl = {
        "coarsened": brute_force_kl(policy, reference, trainer, k=3),
        "full": brute_force_kl(policy, reference, trainer, None),
    }
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    assert log["kl_top_k"] == 3 and log["kl_tail_samples"] == draws
    assert log["kl"] == pytest.approx(kl[expected], rel=rel) and kl["coarsened"] < 0.1 * kl["full"]


def passes_over(tmp_path, tokenizer, count_reference_passes, loss_type, **settings) -> int:
    before = len(count_reference_passes)
    build(tmp_path, tokenizer, loss_type, args_fn=cpu_args, precompute_ref_log_probs=True, **settings)
    return len(count_reference_passes) - before


def test_the_cache_is_keyed_by_k_the_draws_and_the_anchor(tmp_path, tokenizer, count_reference_passes):
    """Another k, other draws, or the summed log-probs of `minor_sft` alone, are other entries; the same settings are
    read back."""
    assert passes_over(tmp_path, tokenizer, count_reference_passes, "sft_kl", ref_top_k=5) == 1
    assert passes_over(tmp_path, tokenizer, count_reference_passes, "asft", ref_top_k=5) == 0
    assert passes_over(tmp_path, tokenizer, count_reference_passes, "sft_kl", ref_top_k=5, ref_tail_samples=8) == 1
    assert passes_over(tmp_path, tokenizer, count_reference_passes, "sft_kl", ref_top_k=5, ref_tail_samples=0) == 1
    assert passes_over(tmp_path, tokenizer, count_reference_passes, "sft_kl", ref_top_k=6) == 1
    assert passes_over(tmp_path, tokenizer, count_reference_passes, "minor_sft") == 1
    assert passes_over(tmp_path, tokenizer, count_reference_passes, "sft_kl", ref_top_k=6) == 0


def test_an_entry_read_back_trains_as_the_one_just_computed(tmp_path, tokenizer):
    def first_log():
        trainer = build(tmp_path, tokenizer, precompute_ref_log_probs=True, ref_top_k=4)
        trainer.train()
        return [log for log in trainer.state.log_history if "loss" in log][0]

    computed, read_back = first_log(), first_log()
    assert read_back["kl"] == computed["kl"] and read_back["loss"] == computed["loss"]


def test_full_fine_tuning_with_the_precomputed_anchor_keeps_one_model(tmp_path, tokenizer):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=step_args(
            tmp_path / "out", loss_type="sft_kl", precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "c")
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
    )
    # Nothing holds the released copy: not the accelerator either, which keeps every model it prepared
    assert trainer.ref_model is None and trainer.reference.modules == [] and trainer.accelerator._models == []
    trainer.reference.token_logps = no_reference_forward
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    # The defaults, the top 64 tokens and 32 draws; the policy is its reference at the first step
    assert log["kl"] == pytest.approx(0.0, abs=1e-6)
    assert log["kl_top_k"] == 64 and log["kl_tail_samples"] == 32


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_a_k_that_is_no_count_of_tokens_is_refused(tmp_path, k):
    with pytest.raises(InputError, match=rf"ref_top_k must be an integer >= 1, got {k!r}"):
        MinorSFTConfig(output_dir=str(tmp_path / "out"), loss_type="sft_kl", ref_top_k=k)


@pytest.mark.parametrize("samples", [-1, 2.5, True, "8"])
def test_draws_that_are_no_count_are_refused(tmp_path, samples):
    with pytest.raises(InputError, match=rf"ref_tail_samples must be an integer >= 0, got {samples!r}"):
        MinorSFTConfig(output_dir=str(tmp_path / "out"), loss_type="sft_kl", ref_tail_samples=samples)


def test_a_k_above_the_vocabulary_keeps_all_of_it_and_says_so(tmp_path, tokenizer, caplog):
    vocabulary = len(tokenizer)
    with caplog.at_level("INFO", logger="minorsft_trl"):
        trainer = build(tmp_path, tokenizer, precompute_ref_log_probs=True, ref_top_k=vocabulary + 1)
    assert f"ref_top_k={vocabulary + 1} is more than the model's {vocabulary} tokens" in caplog.text
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    assert log["kl_top_k"] == vocabulary and log["kl_tail_samples"] == 0


def test_a_cache_that_would_not_fit_on_its_disk_is_refused_before_anything_is_written(
    monkeypatch, tmp_path, tokenizer
):
    monkeypatch.setattr(topk_cache.shutil, "disk_usage", lambda path: SimpleNamespace(free=10_000))
    with pytest.raises(InputError, match=r"answer tokens needs .* GB on disk \(ref_top_k=5 tokens and ref_tail_sa"):
        build(tmp_path, tokenizer, precompute_ref_log_probs=True, ref_top_k=5)
    assert not (tmp_path / "out").exists()


def test_auto_precomputes_the_anchor_and_says_with_what(tmp_path, warnings_of_minorsft):
    args = MinorSFTConfig(output_dir=str(tmp_path / "out"), loss_type="sft_kl", ref_cache_dir=str(tmp_path / "c"))
    assert precompute.resolve_precompute(args, prompt_completion_dataset(), None) is True
    assert any("top ref_top_k=64 tokens and ref_tail_samples=32 draws" in m for m in warnings_of_minorsft)


def test_under_zero3_the_precomputed_anchor_is_refused_and_auto_keeps_the_exact_one(
    monkeypatch, tmp_path, warnings_of_minorsft
):
    monkeypatch.setattr(precompute, "is_deepspeed_zero3_enabled", lambda: True)
    args = MinorSFTConfig(output_dir=str(tmp_path / "out"), loss_type="sft_kl", precompute_ref_log_probs=True)
    with pytest.raises(InputError, match="under DeepSpeed ZeRO-3: the precomputed KL anchor reads the LM head"):
        precompute.resolve_precompute(args, prompt_completion_dataset(), None)
    args = MinorSFTConfig(output_dir=str(tmp_path / "out"), loss_type="sft_kl", ref_cache_dir=str(tmp_path / "c"))
    assert precompute.resolve_precompute(args, prompt_completion_dataset(), None) is False
    assert any("off, loss_type='sft_kl' under DeepSpeed ZeRO-3" in m for m in warnings_of_minorsft)


def test_resuming_with_another_k_or_anchor_is_refused(tmp_path, tokenizer):
    def trainer(**settings):
        return build(
            tmp_path, tokenizer, args_fn=cpu_args, max_steps=1, save_strategy="steps", save_steps=1, **settings
        )

    trainer(precompute_ref_log_probs=True, ref_top_k=4).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    for other, setting in (
        (dict(precompute_ref_log_probs=True, ref_top_k=5), "ref_top_k"),
        (dict(precompute_ref_log_probs=True, ref_top_k=4, ref_tail_samples=3), "ref_tail_samples=32 there, 3 here"),
        (dict(precompute_ref_log_probs=False), "ref_top_k"),
    ):
        with pytest.raises(InputError, match=setting):
            trainer(**other).train(resume_from_checkpoint=checkpoint)
