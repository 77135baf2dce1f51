"""Real multi-process training: `accelerate launch` with the shipped configs, two processes over gloo on CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_recipe

from minorsft_trl.cli.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def launch(*args, num_processes: int = 2, config: str = "ddp", mixed_precision: str | None = "no", fails=False) -> str:
    """`accelerate launch` of a shipped config, as the README says to on a CPU; its output (stdout and stderr). With
    `mixed_precision=None`, the config's own; with `fails`, the launch must fail."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / f"{config}.yaml"),
        "--num_processes", str(num_processes),
        # A port of its own: the suite's workers (`make test`) may launch processes at the same time
        "--main_process_port", str(free_port()),
        *(["--mixed_precision", mixed_precision] if mixed_precision else []),
        *map(str, args),
    ]  # fmt: skip
    # The caller's PYTHONPATH kept after the tests: a checkout run with PYTHONPATH=<checkout> beside another one's
    # editable install launches its own package
    path = os.pathsep.join([str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["PYTHONFAULTHANDLER"] = "1"  # a process killed by a signal prints each thread's stack
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert (result.returncode != 0) == fails, result.stdout[-3000:] + result.stderr[-6000:] + _why(result.stderr)
    # Every launched process has exited: a process hung at exit can outlive a launcher that reported success
    lingering = [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs(pid, args)]
    assert not lingering, f"processes still running after the launch: {lingering}"
    return result.stdout + result.stderr


def free_port() -> int:
    """A TCP port free on this machine now, for the rendezvous of a launch's processes."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _why(stderr: str) -> str:
    """The lines of a failed launch that say why, last: the launcher's summary after them names only the signal."""
    signs = ("Error", "error:", "Fatal Python error", "terminate called", "Thread 0x", "File ", "what():")
    lines = [line for line in stderr.splitlines() if any(sign in line for sign in signs) and "Warning" not in line]
    return "\n--- why ---\n" + "\n".join(lines[-60:])


def _runs(pid: str, args) -> bool:
    """Whether process `pid` runs the launched script with these arguments (its command line holds them all)."""
    try:
        cmdline = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return all(str(arg).encode() in cmdline for arg in args) and b"accelerate.commands.launch" not in cmdline


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    """The tiny model, 8 examples on disk, one SGD step over all of them (no clipping: the update is the gradient)."""
    return write_recipe(tmp_path, tiny_model_dir, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)


def two_processes_and_one(
    tmp_path, tiny_recipe, per_process_batch_size: int, *arguments, own_caches: bool = False
) -> tuple[dict, dict]:
    """The generic script run twice on the tiny recipe: launched as 2 processes of `per_process_batch_size` rows, and
    as 1 process of twice as many (in this one: a launch of one process runs the same code, 8 s later); the trained
    adapter weights of each. With `own_caches` each run precomputes its reference into a cache of its own (else the
    second may read the first's)."""
    batch = ["--per_device_train_batch_size"]
    two, one = (["--ref_cache_dir", tmp_path / f"{run}-cache"] if own_caches else [] for run in ("two", "one"))
    launch(
        REPO / "recipes" / "minor_sft.py", "--config", tiny_recipe, *arguments, *two, *batch, per_process_batch_size,
        "--output_dir", tmp_path / "two",
    )  # fmt: skip
    one = ["--config", tiny_recipe, *arguments, *one, *batch, 2 * per_process_batch_size]
    one += ["--output_dir", tmp_path / "one"]
    main(*parse_args(list(map(str, one))))
    return (
        load_file(tmp_path / "two" / "adapter_model.safetensors"),
        load_file(tmp_path / "one" / "adapter_model.safetensors"),
    )


def assert_same_weights(two: dict, one: dict) -> None:
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_examples_are_counted_across_processes_even_without_averaging_tokens_across_devices(tmp_path, tiny_recipe):
    """8 examples packed at max_length 80 make two rows of 3 and 5 examples: one row per process is a per-rank mean
    of 3 and of 5 examples unless the example count spans both processes (the paper's mean over the global batch).
    The reference is precomputed in one batch of both rows, which the second process repeats and must not count."""
    packed = ["--packing", "true", "--max_length", 80, "--average_tokens_across_devices", "false"]
    # The precompute in one batch of both rows: fewer batches than processes, the second process's share a repeat
    precomputed = ["--precompute_ref_log_probs", "true", "--precompute_ref_batch_size", 8]
    precomputed += ["--ref_cache_dir", tmp_path / "ref-cache"]
    assert_same_weights(*two_processes_and_one(tmp_path, tiny_recipe, 1, *packed, *precomputed))


# The KL anchor from the reference's top 5 tokens and 8 draws from the rest, precomputed a row per batch in both runs:
# each batch's draws are seeded by its number, so the processes between which the batches are shared draw the same
DRAWN = ["--precompute_ref_log_probs", "true", "--ref_top_k", 5, "--ref_tail_samples", 8]
DRAWN += ["--precompute_ref_batch_size", 1]


@pytest.mark.parametrize(
    ("loss_type", "anchor"),
    [("asft", []), ("sft_kl", []), ("sft_kl", DRAWN), ("iw_sft", [])],
    ids=["asft", "sft_kl", "sft_kl top-k and draws", "iw_sft"],
)
def test_the_loss_family_over_two_processes_equals_one_process(tmp_path, tiny_recipe, loss_type, anchor):
    """Two steps (the second away from the reference: KL anchor and importance weights at work) on packed rows of 3
    and 5 examples, one per process, give the weights of one process holding both rows: the example count (`sft_kl`)
    and the token count (`asft`, `iw_sft`, TRL's reduction) span the processes, and so do the precomputed anchor's
    draws."""
    run = ["--loss_type", loss_type, "--kl_coef", 100.0, "--max_steps", 2, "--packing", "true", "--max_length", 80]
    run += anchor
    if loss_type == "asft":  # DFT scales each token's gradient by its probability, ~1/259 on the tiny random model
        run += ["--learning_rate", 100.0]
    assert_same_weights(*two_processes_and_one(tmp_path, tiny_recipe, 1, *run, own_caches=True))
    history = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    second_step = history[1]
    assert second_step.get("kl_tail_samples") == (8 if anchor else None)
    if loss_type == "iw_sft":
        assert second_step["iw_weight_min"] < second_step["iw_weight_max"], "the weights must be at work"
    else:
        # The draws' estimate of the rest's part is noisy on the tiny model (its rest beyond 5 tokens holds 98% of the
        # mass) and can fall below 0; its expectation is the KL
        assert abs(second_step["kl"]) * 100.0 > 1e-3, "the KL anchor must be at work"


def test_a_steered_coefficient_is_the_same_on_every_process_and_as_one_process(tmp_path, tiny_recipe):
    """`target_forward_kl` over packed rows of 3 and 5 examples, one per process: each process steers on the anchor's
    KL of both rows and on the same evaluations, so both train with one coefficient at every step, the one a single
    process holding both rows steers to (a process steering on its own row would train other weights)."""
    run = ["--loss_type", "sft_kl", "--kl_coef", 1.0, "--target_forward_kl", 1e-3, "--max_steps", 6]
    run += ["--packing", "true", "--max_length", 80, "--eval_strategy", "steps", "--eval_steps", 2]
    run += ["--drift_num_prompts", 4, "--drift_max_new_tokens", 8, "--per_device_eval_batch_size", 4]
    assert_same_weights(*two_processes_and_one(tmp_path, tiny_recipe, 1, *run, own_caches=True))
    coefs = {}
    for name in ("two", "one"):
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        coefs[name] = [log["kl_coef"] for log in history if "kl_coef" in log]
    assert len(coefs["one"]) == 6 and coefs["one"][-1] != coefs["one"][0], "the coefficient must move"
    assert coefs["two"] == pytest.approx(coefs["one"], rel=1e-4)  # sums over processes in another order


def test_generic_script_two_processes_x_batch_4_equals_one_process_x_batch_8(tmp_path, tiny_recipe):
    two, one = two_processes_and_one(tmp_path, tiny_recipe, 4)
    # One step over the same 8 examples: the same update only if the example count spans both processes
    assert_same_weights(two, one)
    assert all(tensor.abs().sum() > 0 for name, tensor in one.items() if "lora_B" in name), "B starts at 0"
    state = json.loads((tmp_path / "two" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and "deviation" in state["log_history"][0]
    assert (tmp_path / "two" / "training_curves.png").stat().st_size > 0
    assert "Minor SFT" in (tmp_path / "two" / "README.md").read_text()
