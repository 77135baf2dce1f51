"""What `minorsft-trl compare` says in plain words (`minorsft_trl.drift.verdict`), on hand-made runs with known
answers: no training."""

from test_compare import synthetic_runs

from minorsft_trl.drift import report
from minorsft_trl.drift.grid import make_grid
from minorsft_trl.drift.verdict import plain_words


def sentences(runs, grid, base_accuracy=None) -> list[str]:
    return plain_words(report.summarise(runs, grid), grid, base_accuracy)


def test_which_differences_are_within_noise_and_a_pick_by_drift_with_the_answer_nll_as_gain():
    # Seed by seed against SFT: Minor SFT's NLL +0.02, -0.02, +0.05 and forward KL -0.01, +0.01, -0.01 (both within
    # noise); SFT + KL's NLL +0.01, +0.02, 0 (within) and forward KL -0.30, -0.30, -0.35 (mean -0.317, sd 0.029,
    # half-width 4.303 x 0.029 / sqrt(3) = 0.072: beyond noise)
    grid = make_grid(("sft", "minor_sft", "sft_kl"), (1e-3,), (0, 1, 2), step_control=False)
    runs = (
        synthetic_runs("sft", 1e-3, [2.0, 2.1, 2.2], [0.5, 0.6, 0.7])
        + synthetic_runs("minor_sft", 1e-3, [2.02, 2.08, 2.25], [0.49, 0.61, 0.69])
        + synthetic_runs("sft_kl", 1e-3, [2.01, 2.12, 2.20], [0.2, 0.3, 0.35])
    )
    said = sentences(runs, grid)
    assert said[0] == (
        "Minor SFT against SFT at lr 0.001: held-out answer NLL +0.017 nats/token (95% interval -0.071 to +0.104), "
        "within noise; forward KL -0.003 nats/token (95% interval -0.032 to +0.025), within noise."
    )
    assert said[1].endswith("forward KL -0.317 nats/token (95% interval -0.388 to -0.245), less drift, beyond noise.")
    assert said[2].startswith("Nothing here beats SFT at lr 0.001, SFT + KL at lr 0.001 on both held-out answer NLL")
    assert said[3] == (
        "Pick SFT + KL at lr 0.001 on this data: it moves the model less than SFT beyond noise, forward KL 0.283 "
        "nats/token against 0.600 nats/token for SFT at lr 0.001, -0.317 nats/token (95% interval -0.388 to -0.245); "
        "its held-out answer NLL is not told apart from SFT's, +0.010 nats/token (95% interval -0.015 to +0.035), "
        "within noise."
    )
    # Seeds that would settle a difference: SFT + KL's NLL (mean 0.01, sd 0.01) at 7, t(6) 2.447 / sqrt(7) < 1;
    # Minor SFT's (mean 0.0167, sd 0.0351) at 20; Minor SFT's forward KL (mean -0.0033, sd 0.0115) beyond 30
    assert said[4] == (
        "More seeds, estimated from the spread of these 3 (were it and the mean difference to hold): about 7 would "
        "settle SFT + KL at lr 0.001 against SFT on held-out answer NLL (+0.010 nats/token); about 20 would settle "
        "Minor SFT at lr 0.001 against SFT on held-out answer NLL (+0.017 nats/token). More than 30 seeds would be "
        "needed for Minor SFT at lr 0.001 against SFT on forward KL (-0.003 nats/token): too small against the spread "
        "for seeds to settle."
    )
    assert len(said) == 5


def test_when_nothing_differs_beyond_noise_sft_is_the_pick_and_more_seeds_are_estimated():
    # Minor SFT - SFT accuracy by seed: +1, -1, +3 points (mean 1, sd 2: half-width 4.97); forward KL within noise
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0, 1, 2), step_control=False)
    runs = synthetic_runs("sft", 1e-3, [2.0] * 3, [0.5, 0.6, 0.7], accuracy=[0.80, 0.84, 0.82])
    runs += synthetic_runs("minor_sft", 1e-3, [2.0] * 3, [0.52, 0.57, 0.72], accuracy=[0.81, 0.83, 0.85])
    said = sentences(runs, grid, base_accuracy=0.5)
    assert said[0].startswith("Minor SFT against SFT at lr 0.001: accuracy +1.0 points (95% interval -4.0 to +6.0), ")
    assert said[2] == (
        "Pick SFT at lr 0.001 on this data: no method beats it beyond noise on accuracy or forward KL, and its loss "
        "is the simplest (it needs no reference model)."
    )
    # t(17) / sqrt(18) = 0.495 < 1 / 2 = mean / sd, t(16) / sqrt(17) = 0.512 is not
    assert said[3].startswith(
        "More seeds, estimated from the spread of these 3 (were it and the mean difference to hold): about 18 would "
        "settle Minor SFT at lr 0.001 against SFT on accuracy (+1.0 points)."
    )
    # SFT's accuracy, 82% [77.0, 87.0], is below a base model's 90%
    assert sentences(runs, grid, base_accuracy=0.9)[2].endswith(" Its accuracy is below the base model's 90.0%.")


def test_one_seed_without_accuracy_has_no_interval_and_no_pick():
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0,))
    runs = synthetic_runs("sft", 1e-3, [2.0], [0.3]) + synthetic_runs("minor_sft", 1e-3, [2.5], [0.1])
    runs += synthetic_runs("step_control", 1e-3, [2.2], [0.2], trained_lr=5e-4)
    said = sentences(runs, grid)
    assert said[0] == (
        "Minor SFT against SFT at lr 0.001: held-out answer NLL +0.500 nats/token (one seed: no interval); forward KL "
        "-0.200 nats/token (one seed: no interval)."
    )
    assert said[1].startswith("Minor SFT against plain SFT at its mean step (lr 0.0005, Minor SFT's 0.001 times its")
    assert said[-2] == (
        "No pick is settled with one seed: on seed 0, SFT at lr 0.001 reached the best held-out answer NLL (2.00 "
        "nats/token) and Minor SFT at lr 0.001 the least forward KL (0.100 nats/token)."
    )
    assert said[-1] == (
        "With one seed there are no intervals over seeds: run --seeds 0 1 2 (or more) to settle whether the "
        "differences above are more than noise."
    )


def test_a_single_method_has_nothing_to_pick_between():
    grid = make_grid(("sft",), (1e-4, 1e-3), (0, 1))
    runs = synthetic_runs("sft", 1e-4, [3.0, 3.1], [0.1, 0.2]) + synthetic_runs("sft", 1e-3, [2.0, 2.2], [0.5, 0.6])
    assert sentences(runs, grid)[-1] == (
        "One method (SFT): nothing to pick between. Its best learning rate here is 0.001 (held-out answer NLL 2.10 "
        "nats/token). Add --methods sft minor_sft sft_kl to compare."
    )


def test_the_most_gain_for_its_drift_at_matched_gain_and_what_the_step_size_control_says():
    # Every method's accuracy 60/62/64% at 1e-4 and 80/82/84% at 1e-3, seed by seed alike: matched at 72%, 0.6, 0.5
    # and 0.4 of the way from 1e-4 to 1e-3 for seeds 0, 1 and 2
    grid = make_grid(("sft", "minor_sft", "sft_kl"), (1e-4, 1e-3), (0, 1, 2))
    low, high = [0.60, 0.62, 0.64], [0.80, 0.82, 0.84]
    runs = (
        synthetic_runs("sft", 1e-4, [3.0] * 3, [0.10, 0.12, 0.14], accuracy=low)
        + synthetic_runs("sft", 1e-3, [2.0] * 3, [0.50, 0.60, 0.70], accuracy=high)
        + synthetic_runs("minor_sft", 1e-4, [3.0] * 3, [0.09, 0.11, 0.13], accuracy=low)
        + synthetic_runs("minor_sft", 1e-3, [2.0] * 3, [0.48, 0.58, 0.70], accuracy=high)
        + synthetic_runs("sft_kl", 1e-4, [3.0] * 3, [0.05, 0.06, 0.07], accuracy=low)
        + synthetic_runs("sft_kl", 1e-3, [2.0] * 3, [0.20, 0.24, 0.30], accuracy=high)
        + synthetic_runs("step_control", 1e-3, [2.0] * 3, [0.30, 0.36, 0.40], accuracy=high, trained_lr=5e-4)
    )
    said = sentences(runs, grid, base_accuracy=0.5)
    # Minor SFT - control, forward KL by seed: +0.18, +0.22, +0.30
    assert said[4] == (
        "Minor SFT against plain SFT at its mean step (lr 0.0005, Minor SFT's 0.001 times its mean weight): accuracy "
        "+0.0 points (95% interval +0.0 to +0.0), within noise; forward KL +0.23 nats/token (95% interval +0.08 to "
        "+0.39), more drift, beyond noise. The smaller step alone does better than Minor SFT's re-weighting."
    )
    # At 72%, SFT + KL's forward KL by seed 0.140, 0.150, 0.162; Minor SFT's (the next least) 0.324, 0.345, 0.358:
    # differences -0.184, -0.195, -0.196 (sd 0.0067, half-width 0.0165); SFT's 0.340, 0.360, 0.364
    assert said[5] == (
        "Most gain for its drift: at matched accuracy 72.0% (interpolated between learning rates), SFT + KL drifts "
        "least, forward KL 0.151 nats/token against 0.342 nats/token (Minor SFT) and 0.355 nats/token (SFT); its "
        "difference from Minor SFT's, -0.192 nats/token (95% interval -0.208 to -0.175), is beyond noise."
    )
    assert said[6] == (
        "Pick SFT + KL at lr 0.001 on this data: it moves the model less than SFT beyond noise, forward KL 0.247 "
        "nats/token against 0.600 nats/token for SFT at lr 0.001, -0.35 nats/token (95% interval -0.48 to -0.23); its "
        "accuracy the same as SFT's on every seed. Its best learning rate is the largest of the grid: a larger one "
        "may do better."
    )


def test_a_method_that_gains_more_and_drifts_more_is_a_trade_not_a_pick():
    grid = make_grid(("sft", "sft_kl"), (1e-3,), (0, 1, 2))
    runs = synthetic_runs("sft", 1e-3, [2.0] * 3, [0.5, 0.6, 0.7], accuracy=[0.80, 0.84, 0.82])
    runs += synthetic_runs("sft_kl", 1e-3, [2.0] * 3, [0.7, 0.8, 0.95], accuracy=[0.83, 0.87, 0.86])
    assert sentences(runs, grid)[2] == (
        "No method beats SFT on both accuracy and drift: SFT + KL at lr 0.001 gains more, +3.3 points (95% interval "
        "+1.9 to +4.8), but drifts more, +0.217 nats/token (95% interval +0.145 to +0.288). Pick by what matters more "
        "on your data: the accuracy (SFT + KL at lr 0.001) or staying close to the reference (SFT at lr 0.001)."
    )


def test_without_sft_nothing_is_paired():
    grid = make_grid(("minor_sft", "sft_kl"), (1e-3,), (0, 1, 2), step_control=False)
    runs = synthetic_runs("minor_sft", 1e-3, [2.0, 2.1, 2.2], [0.5, 0.6, 0.7])
    runs += synthetic_runs("sft_kl", 1e-3, [2.3, 2.4, 2.5], [0.2, 0.3, 0.35])
    assert sentences(runs, grid)[-1] == (
        "Without SFT among the methods nothing is paired: Minor SFT at lr 0.001 reached the best held-out answer NLL "
        "(2.10 nats/token, against 2.40 nats/token for SFT + KL at lr 0.001); their 95% intervals overlap, so the "
        "order may be noise."
    )


def test_results_md_ends_with_what_it_says(tmp_path):
    grid = make_grid(("sft", "minor_sft"), (1e-3,), (0, 1, 2), step_control=False)
    runs = synthetic_runs("sft", 1e-3, [2.0] * 3, [0.5, 0.6, 0.7], accuracy=[0.80, 0.84, 0.82])
    runs += synthetic_runs("minor_sft", 1e-3, [2.0] * 3, [0.52, 0.57, 0.72], accuracy=[0.81, 0.83, 0.85])
    text = report.write_outputs({"runs": runs}, grid, tmp_path, wall_seconds=60.0)
    section = text.split("\n## What this says\n", 1)[1]
    assert "Wall time of the runs" in text.split("## What this says")[0]
    assert [line for line in section.splitlines() if line.startswith("- ")] == [
        f"- {sentence}" for sentence in sentences(runs, grid)
    ]
    assert text.endswith(section) and (tmp_path / "results.md").read_text() == text


def test_no_sentence_compares_forward_kls_of_two_estimators():
    grid = make_grid(("sft", "sft_kl"), (1e-3,), (0, 1, 2))
    sft = synthetic_runs("sft", 1e-3, [2.0, 2.1, 2.2], [-0.043, -0.040, -0.046])
    kl = synthetic_runs("sft_kl", 1e-3, [1.9, 1.95, 2.05], [0.182, 0.180, 0.184])
    for run in sft:
        run["forward_kl_source"] = "eval_forward_kl_sampled"
    said = sentences(sft + kl, grid)
    # NLL by seed -0.10, -0.15, -0.15: mean -0.133, sd 0.029, half-width 0.072
    assert said[0] == (
        "SFT + KL against SFT at lr 0.001: held-out answer NLL -0.133 nats/token (95% interval -0.205 to -0.062), "
        "better, beyond noise."
    )
    assert said[1].endswith(
        "-0.133 nats/token (95% interval -0.205 to -0.062); its forward KL is not compared with SFT's, taken by "
        "another estimator (see the note above)."
    )
    assert not any("forward KL 0." in sentence or "forward KL -0." in sentence for sentence in said)
