"""Real multi-process training: `accelerate launch` with the shipped configs, two processes over gloo on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_recipe

from minorsft_trl.checkpoints import MANIFEST

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def launch(*args, num_processes: int = 2, config: str = "ddp", mixed_precision: str | None = "no", fails=False) -> str:
    """`accelerate launch` of a shipped config, as the README says to on a CPU; its output (stdout and stderr). With
    `mixed_precision=None`, the config's own; with `fails`, the launch must fail."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / f"{config}.yaml"),
        "--num_processes", str(num_processes),
        *(["--mixed_precision", mixed_precision] if mixed_precision else []),
        *map(str, args),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert (result.returncode != 0) == fails, result.stdout[-3000:] + result.stderr[-6000:]
    # Every launched process has exited: a process hung at exit can outlive a launcher that reported success
    lingering = [pid for pid in os.listdir("/proc") if pid.isdigit() and _runs(pid, args)]
    assert not lingering, f"processes still running after the launch: {lingering}"
    return result.stdout + result.stderr


def _runs(pid: str, args) -> bool:
    """Whether process `pid` runs the launched script with these arguments (its command line holds them all)."""
    try:
        cmdline = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return all(str(arg).encode() in cmdline for arg in args) and b"accelerate.commands.launch" not in cmdline


def rank_reports(out_dir: Path) -> list[dict]:
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_processes_train_in_lockstep(tmp_path, tiny_model_dir):
    launch(REPO / "tests" / "distributed_worker.py", tiny_model_dir, tmp_path)
    first, second = rank_reports(tmp_path)
    # Without `use_cpu=True` each process would silently train alone (DistributedType.NO, world size 1)
    assert first["world_size"] == second["world_size"] == 2
    assert first["distributed_type"] == second["distributed_type"] == "DistributedType.MULTI_CPU"
    assert first["losses"] == second["losses"] and len(first["losses"]) == 2
    assert first["deviation"] == second["deviation"]
    assert first["weights_sha256"] == second["weights_sha256"]


def test_two_processes_with_a_precomputed_reference_train_as_on_the_fly(tmp_path, tiny_model_dir):
    """Each rank's batches carry the precomputed values of its own examples."""
    launch(REPO / "tests" / "distributed_worker.py", tiny_model_dir, tmp_path / "fly")
    launch(REPO / "tests" / "distributed_worker.py", tiny_model_dir, tmp_path / "pre", "precompute")
    assert any((tmp_path / "pre" / "cache").iterdir())
    for rank in range(2):
        fly, pre = (torch.load(tmp_path / run / f"rank{rank}.pt") for run in ("fly", "pre"))
        for name, tensor in fly.items():
            torch.testing.assert_close(pre[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    fly_report, pre_report = (rank_reports(tmp_path / run)[0] for run in ("fly", "pre"))
    assert pre_report["losses"] == pytest.approx(fly_report["losses"], rel=1e-5)
    assert pre_report["deviation"] == pytest.approx(fly_report["deviation"], rel=1e-4, abs=1e-7)


def flat(ref_logps: list[list[float]]) -> list[float]:
    return [value for row in ref_logps for value in row]


def one_process_precompute(tmp_path, model_dir) -> list[float]:
    launch(REPO / "tests" / "distributed_worker.py", model_dir, tmp_path / "one", "precompute", num_processes=1,
           config="single_gpu")  # fmt: skip
    return flat(json.loads((tmp_path / "one" / "rank0.json").read_text())["ref_logps"])


def test_two_processes_share_the_precompute_and_get_the_one_process_values(tmp_path, tiny_model_dir):
    launch(REPO / "tests" / "distributed_worker.py", tiny_model_dir, tmp_path / "two", "precompute")
    first, second = rank_reports(tmp_path / "two")
    # 8 examples in batches of 2: each process runs 2 of the 4 reference forwards
    assert first["reference_forwards"] == second["reference_forwards"] == 2
    assert first["ref_logps"] == second["ref_logps"]
    expected = one_process_precompute(tmp_path, tiny_model_dir)
    assert flat(first["ref_logps"]) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_a_reference_sharded_with_fsdp2_is_hashed_and_precomputed_across_processes(tmp_path, tiny_model_dir):
    """FSDP2 over a CPU device mesh (gloo): the reference is sharded before the precompute; its fingerprint is taken
    before sharding, and every process joins each forward of the sharded model."""
    launch(REPO / "tests" / "distributed_worker.py", tiny_model_dir, tmp_path / "fsdp", "fsdp reference")
    first, second = rank_reports(tmp_path / "fsdp")
    assert first["fsdp"] and first["reference_sharded"] and second["reference_sharded"]
    assert first["reference_forwards"] == second["reference_forwards"] == 2
    expected = one_process_precompute(tmp_path, tiny_model_dir)  # the same weights, unsharded, as the reference
    assert first["ref_logps"] == second["ref_logps"]
    assert flat(first["ref_logps"]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_a_checkpoint_is_marked_complete_only_once_every_process_has_written_its_part(tmp_path, tiny_model_dir):
    launch(REPO / "tests" / "distributed_worker.py", tiny_model_dir, tmp_path, "sharded save")
    for step in (1, 2):
        manifest = json.loads((tmp_path / f"checkpoint-{step}" / MANIFEST).read_text())
        assert "shard-rank1.bin" in manifest, f"checkpoint-{step} was marked complete before process 1 finished"


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    """The tiny model, 8 examples on disk, one SGD step over all of them (no clipping: the update is the gradient)."""
    return write_recipe(tmp_path, tiny_model_dir, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)


def two_processes_and_one(
    tmp_path, tiny_recipe, per_process_batch_size: int, *arguments, config: str = "ddp"
) -> tuple[dict, dict]:
    """The generic script run twice on the tiny recipe: 2 processes of `per_process_batch_size` rows (launched with
    `config`), and 1 process of twice as many; the trained weights of each (the adapter's, or the whole model's)."""
    script = REPO / "recipes" / "minor_sft.py"
    batch = ["--per_device_train_batch_size"]
    launch(
        script, "--config", tiny_recipe, *arguments, *batch, per_process_batch_size, "--output_dir", tmp_path / "two",
        config=config,
    )  # fmt: skip
    launch(
        script, "--config", tiny_recipe, *arguments, *batch, 2 * per_process_batch_size, "--output_dir",
        tmp_path / "one", num_processes=1, config="single_gpu",
    )  # fmt: skip
    return tuple(
        load_file(
            next(path for path in (run / "adapter_model.safetensors", run / "model.safetensors") if path.exists())
        )
        for run in (tmp_path / "two", tmp_path / "one")
    )


def assert_same_weights(two: dict, one: dict) -> None:
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_examples_are_counted_across_processes_even_without_averaging_tokens_across_devices(tmp_path, tiny_recipe):
    """8 examples packed at max_length 80 make two rows of 3 and 5 examples: one row per process is a per-rank mean
    of 3 and of 5 examples unless the example count spans both processes (the paper's mean over the global batch)."""
    packed = ["--packing", "true", "--max_length", 80, "--average_tokens_across_devices", "false"]
    assert_same_weights(*two_processes_and_one(tmp_path, tiny_recipe, 1, *packed))


@pytest.mark.parametrize("loss_type", ["asft", "sft_kl", "iw_sft"])
def test_the_loss_family_over_two_processes_equals_one_process(tmp_path, tiny_recipe, loss_type):
    """Two steps (the second away from the reference: KL anchor and importance weights at work) on packed rows of 3
    and 5 examples, one per process, give the weights of one process holding both rows: the example count (`sft_kl`)
    and the token count (`asft`, `iw_sft`, TRL's reduction) span the processes."""
    run = ["--loss_type", loss_type, "--kl_coef", 100.0, "--max_steps", 2, "--packing", "true", "--max_length", 80]
    if loss_type == "asft":  # DFT scales each token's gradient by its probability, ~1/259 on the tiny random model
        run += ["--learning_rate", 100.0]
    assert_same_weights(*two_processes_and_one(tmp_path, tiny_recipe, 1, *run))
    history = json.loads((tmp_path / "two" / "trainer_state.json").read_text())["log_history"]
    second_step = history[1]
    if loss_type == "iw_sft":
        assert second_step["iw_weight_min"] < second_step["iw_weight_max"], "the weights must be at work"
    else:
        assert second_step["kl"] * 100.0 > 1e-3, "the KL anchor must be at work"


def test_generic_script_two_processes_x_batch_4_equals_one_process_x_batch_8(tmp_path, tiny_recipe):
    two, one = two_processes_and_one(tmp_path, tiny_recipe, 4)
    # One step over the same 8 examples: the same update only if the example count spans both processes
    assert_same_weights(two, one)
    assert all(tensor.abs().sum() > 0 for name, tensor in one.items() if "lora_B" in name), "B starts at 0"
    state = json.loads((tmp_path / "two" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and "deviation" in state["log_history"][0]
    assert (tmp_path / "two" / "training_curves.png").stat().st_size > 0
    assert "Minor SFT" in (tmp_path / "two" / "README.md").read_text()


@pytest.mark.parametrize(
    "config, options",
    [("ddp", []), ("zero3", []), ("zero3", ["--use_peft", "false", "--loss_type", "nll"])],
    ids=["ddp, LoRA", "zero3, LoRA", "zero3, full fine-tuning without a reference"],
)
def test_drift_measures_over_two_processes_equal_one_process(tmp_path, tiny_recipe, config, options):
    """40 prompts make batches of 16, 16 and 8 rows: one process scores two of them, the other one and a spare; the
    reference's samples, the forward KL, the NLL change and the held-out m_theta equal those of one process. Under
    ZeRO-3 the model is partitioned: every process joins each forward; full fine-tuning keeps no reference, and its
    samples are drawn before training, through a DeepSpeed inference engine."""
    prompts, texts = tmp_path / "prompts.jsonl", tmp_path / "texts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i} + {i} ="}) + "\n" for i in range(40)))
    texts.write_text(
        "".join(json.dumps({"text": f"the number {i} is {'odd' if i % 2 else 'even'}"}) + "\n" for i in range(11))
    )
    run = ["--max_steps", 2, "--eval_strategy", "steps", "--eval_steps", 1, "--drift_prompts", prompts]
    run += ["--drift_text_dataset", texts, "--drift_num_prompts", 40, "--ref_cache_dir", tmp_path / "cache", *options]
    assert_same_weights(*two_processes_and_one(tmp_path, tiny_recipe, 4, *run, config=config))
    forward_kl = "eval_forward_kl" if not options else "eval_forward_kl_sampled"  # no reference kept
    measures = {}
    for name in ("two", "one"):
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        measures[name] = [
            (log["step"], log[forward_kl], log.get("eval_nll_change"), log.get("eval_deviation"))
            for log in history
            if forward_kl in log
        ]
    two, one = measures["two"], measures["one"]
    assert [row[0] for row in two] == [row[0] for row in one] == [0, 1, 2]
    assert two[0][1] == pytest.approx(0.0, abs=1e-7) and one[0][1] == pytest.approx(0.0, abs=1e-7)
    assert two[-1][1] > 1e-6
    for row_two, row_one in zip(two, one, strict=True):
        for value_two, value_one in zip(row_two[1:], row_one[1:], strict=True):
            assert value_two == (None if value_one is None else pytest.approx(value_one, rel=1e-4, abs=1e-7))
