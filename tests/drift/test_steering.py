"""The drift budget that steers (`target_forward_kl`, `minorsft_trl.drift.steering`): the law on its own, and runs on
a tiny model that must end within the budget a free run exceeds, continue their path on resume, and refuse bad
input with the fix."""

import json
import math

import pytest
from test_drift import StopAt, drift_args, drift_logs, make_trainer
from transformers import TrainerControl, TrainerState

from minorsft_trl.drift import steering
from minorsft_trl.drift.live import drift_log_history
from minorsft_trl.drift.steering import COEF_RANGE, KLCoefController

# Full fine-tuning of the tiny model at this rate drifts far past the budget below within 40 steps (LoRA on q and v
# saturates near 0.01 nats/token)
STEERED = dict(peft_config=None, loss_type="sft_kl", learning_rate=1e-2, eval_steps=4, max_steps=40)
TARGET = 0.3


def coef_path(trainer) -> dict[int, float]:
    return {log["step"]: log["kl_coef"] for log in trainer.state.log_history if "kl_coef" in log}


# ------------------------------------------------------------------ the law


def stepped(controller: KLCoefController, step_kl: float, steps: int = 1) -> float:
    """The coefficient after `steps` optimizer steps whose anchor KL is `step_kl` per token."""
    for _ in range(steps):
        controller.add(step_kl * 10, 10)
        controller.on_step_end(None, TrainerState(), TrainerControl())
    return controller.coef


def evaluated(controller: KLCoefController, forward_kl: float, step: int = 4) -> None:
    state = TrainerState()
    state.global_step = step
    controller.on_evaluate(None, state, TrainerControl(), metrics={"eval_forward_kl": forward_kl})


def test_the_coefficient_waits_for_the_first_calibration_then_moves_towards_the_budget():
    controller = KLCoefController(target=0.5, start=0.05)
    assert stepped(controller, 2.0, steps=3) == 0.05  # nothing says yet how the training KL maps on the budget's
    evaluated(controller, forward_kl=1.0)  # the training KL 2.0 is a forward KL of 1.0: calibration 0.5
    assert controller.calibration == pytest.approx(0.5)
    over = stepped(controller, 2.0)  # estimate 1.0 against the set point 0.45 (90% of the budget): up
    assert over == pytest.approx(0.05 * math.exp(steering.GAIN * math.log(1.0 / (steering.MARGIN * 0.5))))
    for _ in range(20):  # room: the smoothed KL falls to 0.4, an estimate of 0.2, and the coefficient with it
        stepped(controller, 0.4)
    assert controller.coef < over
    assert controller.estimate == pytest.approx(0.2, rel=0.01)
    at_set_point = KLCoefController(target=0.5, start=0.05)
    stepped(at_set_point, 1.0)
    evaluated(at_set_point, forward_kl=steering.MARGIN * 0.5)
    assert stepped(at_set_point, 1.0, steps=5) == pytest.approx(0.05)


def test_the_coefficient_stays_within_its_range_and_says_when_the_budget_cannot_be_met(warnings_of_minorsft):
    controller = KLCoefController(target=0.1, start=50.0)
    stepped(controller, 1.0)
    evaluated(controller, forward_kl=10.0)
    assert stepped(controller, 1.0, steps=100) == COEF_RANGE[1]
    evaluated(controller, forward_kl=10.0, step=104)
    assert controller.at_ceiling_over_budget == (104, 10.0)
    assert any("target_forward_kl=0.1 is not met at step 104" in w for w in warnings_of_minorsft)
    low = KLCoefController(target=0.1, start=1e-3)
    stepped(low, 1e-4)
    evaluated(low, forward_kl=1e-4)
    assert stepped(low, 1e-4, steps=10) == COEF_RANGE[0]


def test_an_evaluation_before_the_first_step_does_not_calibrate():
    controller = KLCoefController(target=0.5, start=0.05)
    evaluated(controller, forward_kl=0.0, step=0)
    assert controller.calibration is None


# ------------------------------------------------------------------ runs


def test_a_budgeted_run_ends_within_the_budget_that_the_free_run_exceeds(tmp_path, tokenizer):
    free = make_trainer(tmp_path / "free", tokenizer, **STEERED)
    free.train()
    free_kl = drift_logs(free, "eval_forward_kl")[-1][1]
    assert free_kl > 3 * TARGET
    budgeted = make_trainer(tmp_path / "budget", tokenizer, target_forward_kl=TARGET, **STEERED)
    budgeted.train()
    kl = drift_logs(budgeted, "eval_forward_kl")
    assert kl[0] == (0, 0.0)  # the measures before the first step stay 0
    assert 0.7 * TARGET <= kl[-1][1] <= 1.1 * TARGET, kl
    path = coef_path(budgeted)
    assert sorted(path) == list(range(1, 41))  # logged every step
    assert path[1] == 0.05 and max(path.values()) > 10 * 0.05
    budgeted.create_model_card()
    card = (tmp_path / "budget" / "out" / "README.md").read_text()
    assert f"Drift budget `target_forward_kl={TARGET:g}` steered" in card and "`kl_coef` started at 0.05" in card
    assert f"ended at eval_forward_kl={kl[-1][1]:.4g}" in card
    # A panel for the coefficient: loss, deviation, kl, kl_coef, and the forward KL with the budget's line
    from matplotlib.image import imread

    from minorsft_trl.drift.curves import plot_training_curves

    logs = drift_log_history(budgeted.state)
    steered = plot_training_curves(logs, tmp_path / "steered.png", target_forward_kl=TARGET)
    fixed = plot_training_curves(drift_log_history(free.state), tmp_path / "fixed.png")
    assert imread(steered).shape[1] == pytest.approx(imread(fixed).shape[1] * 5 / 4, abs=3)


@pytest.mark.parametrize("loss_type", ["sft_kl", "asft"])
def test_the_loss_trains_with_the_steered_coefficient(tmp_path, tokenizer, loss_type):
    """A coefficient held at 0.3 by the controller trains exactly as `kl_coef=0.3`: the loss reads the controller's."""
    run = {**STEERED, "max_steps": 3, "loss_type": loss_type}
    fixed = make_trainer(tmp_path / "fixed", tokenizer, **{**run, "kl_coef": 0.3})
    fixed.train()
    held = make_trainer(tmp_path / "held", tokenizer, target_forward_kl=TARGET, **run)
    held.kl_steering.coef = 0.3  # no evaluation within 3 steps: not calibrated, so it stays
    held.train()
    assert [log["loss"] for log in held.state.log_history if "loss" in log] == pytest.approx(
        [log["loss"] for log in fixed.state.log_history if "loss" in log], rel=1e-6
    )
    assert set(coef_path(held).values()) == {0.3}


def test_the_coefficient_steers_on_the_whole_step_whatever_its_accumulation_split(tmp_path, tokenizer):
    """The controller sums the anchor's KL over every micro-batch of an optimizer step (token-weighted): 8 examples in
    one micro-batch and in micro-batches of 3, 3 and 2 give one path."""
    run = dict(STEERED, max_steps=12, target_forward_kl=TARGET)
    whole = make_trainer(tmp_path / "whole", tokenizer, **run)
    whole.train()
    split = make_trainer(
        tmp_path / "split", tokenizer, per_device_train_batch_size=3, gradient_accumulation_steps=3, **run
    )
    split.train()
    expected, got = coef_path(whole), coef_path(split)
    assert len(set(expected.values())) > 2, "the coefficient must move"
    assert got == {step: pytest.approx(coef, rel=1e-4) for step, coef in expected.items()}


def test_a_resumed_run_continues_the_coefficient_path(tmp_path, tokenizer):
    run = dict(STEERED, max_steps=16, target_forward_kl=TARGET, save_strategy="steps", save_steps=4)
    whole = make_trainer(tmp_path / "whole", tokenizer, **run)
    whole.train()
    interrupted = make_trainer(tmp_path / "parts", tokenizer, **run)
    interrupted.add_callback(StopAt(8))
    interrupted.train()
    resumed = make_trainer(tmp_path / "parts", tokenizer, **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "out" / "checkpoint-8"))
    expected, got = coef_path(whole), coef_path(resumed)
    assert expected[8] != expected[16], "the coefficient must move after the checkpoint"
    assert {s: got[s] for s in range(9, 17)} == {s: pytest.approx(expected[s], rel=1e-4) for s in range(9, 17)}
    state = json.loads((tmp_path / "parts" / "out" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["KLCoefController"]["args"]["target"] == TARGET


def test_a_resume_with_another_budget_is_refused_naming_both(tmp_path, tokenizer):
    run = dict(STEERED, max_steps=4, save_strategy="steps", save_steps=4)
    make_trainer(tmp_path, tokenizer, target_forward_kl=TARGET, **run).train()
    other = make_trainer(tmp_path, tokenizer, target_forward_kl=0.5, **run)
    with pytest.raises(ValueError, match=r"target_forward_kl=0.3 there, 0.5 here"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(target_forward_kl=0.0), "target_forward_kl must be a finite number > 0, got 0.0"),
        (dict(target_forward_kl=-0.5), "target_forward_kl must be a finite number > 0, got -0.5"),
        (dict(target_forward_kl=float("nan")), "target_forward_kl must be a finite number > 0, got nan"),
        (dict(target_forward_kl=float("inf")), "target_forward_kl must be a finite number > 0, got inf"),
        (dict(target_forward_kl=0.5, loss_type="minor_sft"), "loss_type='minor_sft' has no KL anchor. Use"),
        (dict(target_forward_kl=0.5, loss_type="nll"), "loss_type='nll' has no KL anchor"),
        (dict(target_forward_kl=0.5, kl_coef=0.0), "which must then be > 0, got 0.0"),
        (dict(target_forward_kl=0.5, eval_drift=False), "eval_drift=False. Set eval_drift=True"),
        (dict(target_forward_kl=0.5, eval_strategy="no"), "calibrated at evaluations, but eval_strategy='no'"),
        (
            dict(target_forward_kl=0.5, max_forward_kl=0.4, save_strategy="steps", save_steps=2),
            "max_forward_kl=0.4 is below target_forward_kl=0.5",
        ),
    ],
)
def test_bad_budgets_are_refused_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        drift_args(tmp_path, **{"loss_type": "sft_kl", **overrides})


def test_a_budget_without_an_eval_split_is_refused_before_the_output_directory_is_made(tmp_path, tokenizer):
    from tiny import make_model, prompt_completion_dataset

    from minorsft_trl import MinorSFTTrainer

    args = drift_args(tmp_path, loss_type="sft_kl", target_forward_kl=0.5)
    with pytest.raises(ValueError, match="target_forward_kl=0.5: the drift measures run at evaluations"):
        MinorSFTTrainer(
            make_model(tokenizer), args=args, train_dataset=prompt_completion_dataset(), processing_class=tokenizer
        )
    assert not (tmp_path / "out").exists()


def test_a_steered_budget_keeps_the_hard_stop_of_max_forward_kl_beside_it(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        target_forward_kl=TARGET,
        max_forward_kl=1.1 * TARGET,
        save_strategy="steps",
        save_steps=4,
        **{**STEERED, "max_steps": 4},
    )
    assert trainer.kl_steering is not None and trainer._drift_budget.max_forward_kl == pytest.approx(0.33)
    trainer.train()
    assert trainer._drift_budget.exceeded is None and coef_path(trainer)[1] == 0.05


def test_the_command_line_takes_a_budget(tmp_path):
    from minorsft_trl.cli.train import parse_args

    args = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path)]
    training_args = parse_args(
        [*args, "--loss_type", "sft_kl", "--target_forward_kl", "0.5", "--eval_strategy", "steps"]
    )[1]
    assert training_args.target_forward_kl == 0.5
    assert training_args.describe_loss() == "sft_kl (kl_coef steered from 0.05 to target_forward_kl=0.5, lr=2e-05)"
