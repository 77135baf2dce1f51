"""What a user is told: a warning for input that is legitimate but probably not meant, a trainer that reports to
TensorBoard offline, and nothing that fails a run after it succeeded."""

import pytest
from accelerate.state import AcceleratorState
from test_gradients import lora_config
from tiny import cpu_args, make_model, prompt_completion_dataset

from minorsft_trl import MinorSFTTrainer
from minorsft_trl.drift.curves import plot_training_curves
from minorsft_trl.precision import autocast_precision


def trainer(tmp_path, tokenizer, dataset=None, **overrides):
    return MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, **{"max_steps": 1, **overrides}),
        train_dataset=dataset if dataset is not None else prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def test_empty_completions_are_reported(tmp_path, tokenizer, warnings_of_minorsft):
    dataset = prompt_completion_dataset().map(lambda row, i: {"completion": "" if i in (2, 5) else row["completion"]},
                                              with_indices=True)  # fmt: skip
    trainer(tmp_path, tokenizer, dataset)
    assert any(
        "2 examples of `train_dataset` have an empty completion (rows [2, 5])" in m for m in warnings_of_minorsft
    )


@pytest.mark.parametrize(("loss_type", "weight"), [("minor_sft", "minor_weight"), ("sft_dpo", "dpo_weight")])
def test_a_brake_that_stops_all_learning_is_reported(tmp_path, tokenizer, warnings_of_minorsft, loss_type, weight):
    # beta=1e9: once the policy moves, every weight 2*sigmoid(-beta*r) (sigmoid(-beta*r) for sft_dpo) is 0 and nothing
    # is learned any more
    run = trainer(
        tmp_path, tokenizer, loss_type=loss_type, beta=1e9, max_steps=3, learning_rate=5e-2,
        per_device_train_batch_size=4,
    )  # fmt: skip
    run.train()
    stalled_windows = [log[f"{weight}_max"] < 1e-3 for log in run.state.log_history if "loss" in log]
    assert stalled_windows[0] is False and stalled_windows[-1] is True
    stalled = [m for m in warnings_of_minorsft if "the brake has stopped learning" in m]
    assert len(stalled) == sum(stalled_windows)
    assert f"`{weight}`" in stalled[0] and "beta=1e+09 is too large" in stalled[0]
    large_start = [m for m in warnings_of_minorsft if "beta/2 = 5e+08 times the gradient" in m]
    assert len(large_start) == (loss_type == "sft_dpo")


def test_a_normal_run_is_not_reported(tmp_path, tokenizer, warnings_of_minorsft):
    trainer(tmp_path, tokenizer, max_steps=2).train()
    assert warnings_of_minorsft == []


def test_plots_never_fail_a_run(tmp_path, monkeypatch, warnings_of_minorsft):
    assert plot_training_curves([{"train_runtime": 1.0}], tmp_path / "curves.png") is None
    assert "logged no training loss" in warnings_of_minorsft[-1]
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # not installed
    assert plot_training_curves([{"loss": 1.0, "step": 1}], tmp_path / "curves.png") is None
    assert "matplotlib is not installed" in warnings_of_minorsft[-1]
    assert not (tmp_path / "curves.png").exists()


def test_report_to_tensorboard_writes_the_minor_sft_curves(tmp_path, tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer(tmp_path, tokenizer, max_steps=2, report_to=["tensorboard"]).train()
    (events,) = (tmp_path / "runs").rglob("events.out.tfevents.*")  # transformers' default: <output_dir>/runs/...
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/deviation", "train/minor_weight", "train/minor_weight_min"} <= set(tags)


def test_an_fp16_launch_on_a_cpu_says_it_is_ignored(tmp_path, tokenizer, monkeypatch, warnings_of_minorsft):
    """`accelerate launch --mixed_precision fp16 --cpu`: accelerate has no fp16 autocast on a CPU and trains in
    float32 without a word."""
    AcceleratorState._reset_state(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    try:
        run = trainer(tmp_path, tokenizer)
    finally:
        AcceleratorState._reset_state(True)
    assert autocast_precision(run.accelerator) == "no"
    assert any("mixed_precision='fp16' (from the accelerate config" in m and "ignored on this device (cpu" in m
               for m in warnings_of_minorsft)  # fmt: skip
    assert not any("run under fp16 autocast" in m for m in warnings_of_minorsft)
