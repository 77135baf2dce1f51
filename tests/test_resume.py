"""Nothing lost: a run killed with SIGKILL resumes to the result of an uninterrupted run; half-written checkpoints and
caches are never trusted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_gradients import lora_config
from tiny import cpu_args, make_model, prompt_completion_dataset, write_recipe

import minorsft_trl.checkpoints as checkpoints_module
from minorsft_trl import MinorSFTTrainer
from minorsft_trl.checkpoints import MANIFEST, is_complete, last_complete_checkpoint, mark_complete

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "minor_sft.py"
sys.path.insert(0, str(REPO / "recipes"))

from minor_sft import main, parse_args  # noqa: E402


def command(recipe: Path, *extra) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(recipe), *map(str, extra)]


def environment(cache_dir: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "MINORSFT_TRL_CACHE": str(cache_dir)}


def run_to_completion(recipe: Path, cache_dir: Path, *extra) -> None:
    """The script's `main` in this process (a process of its own would run the same code seconds later)."""
    with mock.patch.dict(os.environ, MINORSFT_TRL_CACHE=str(cache_dir)):
        main(*parse_args(["--config", str(recipe), *map(str, extra)]))


def kill_when(recipe: Path, cache_dir: Path, ready, *extra, timeout: float = 300) -> None:
    """Start the script and SIGKILL it as soon as `ready()` holds; fail if it ends by itself first."""
    process = subprocess.Popen(
        command(recipe, *extra), env=environment(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def logged(output_dir: Path) -> list[tuple]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [(log["step"], log["loss"], log["deviation"]) for log in state["log_history"] if "loss" in log]


@pytest.mark.parametrize("precompute", [False, True], ids=["adapter-disabled reference", "precomputed reference"])
def test_killed_run_resumes_to_the_same_adapter_losses_and_deviation(tmp_path, tiny_model_dir, precompute):
    settings = dict(
        max_steps=60, save_steps=6, save_strategy="steps", per_device_train_batch_size=2, lora_dropout=0.1,
        learning_rate=1e-3, precompute_ref_log_probs=precompute,
    )  # fmt: skip
    recipe = write_recipe(tmp_path, tiny_model_dir, **settings)
    cache = tmp_path / "cache"
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_to_completion(recipe, cache, "--output_dir", straight)

    # Killed mid-epoch (4 steps per epoch), right after checkpoint-18 is complete
    kill_when(recipe, cache, lambda: (interrupted / "checkpoint-18" / MANIFEST).exists(), "--output_dir", interrupted)
    assert not (interrupted / "adapter_model.safetensors").exists()
    run_to_completion(recipe, cache, "--output_dir", interrupted, "--resume_from_checkpoint", "true")

    np.testing.assert_allclose(np.array(logged(interrupted)), np.array(logged(straight)), rtol=1e-5, atol=1e-7)
    resumed, reference = (load_file(d / "adapter_model.safetensors") for d in (interrupted, straight))
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_half_written_checkpoint_is_never_resumed(tmp_path, tokenizer):
    def trainer(max_steps):
        args = cpu_args(
            tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, per_device_train_batch_size=4
        )
        return MinorSFTTrainer(
            make_model(tokenizer),
            args=args,
            train_dataset=prompt_completion_dataset(),
            processing_class=tokenizer,
            peft_config=lora_config(),
        )

    trainer(4).train()
    assert is_complete(tmp_path / "checkpoint-2") and is_complete(tmp_path / "checkpoint-4")
    # checkpoint-4 was being written when the run died: its adapter is truncated; checkpoint-6 has no manifest yet
    adapter = tmp_path / "checkpoint-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text("{")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")

    with pytest.raises(ValueError, match=r"checkpoint-4' is incomplete.*The last complete one is .*checkpoint-2"):
        trainer(6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    resumed = trainer(6)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert [log["step"] for log in resumed.state.log_history if "loss" in log] == [1, 2, 3, 4, 5, 6]


def keeping_one_checkpoint(tmp_path, tokenizer, max_steps):
    """A run that saves after every step and keeps one checkpoint (`save_total_limit=1`)."""
    return MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(
            tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1, save_total_limit=1,
            per_device_train_batch_size=4,
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )  # fmt: skip


def test_a_run_killed_between_saving_and_rotating_keeps_its_last_complete_checkpoint(tmp_path, tokenizer, monkeypatch):
    # save_total_limit=1: the old checkpoint may go only once the new one is complete
    marked = []

    def killed_on_the_second_checkpoint(checkpoint):
        if marked:
            raise KeyboardInterrupt("killed")
        marked.append(checkpoint)
        mark_complete(checkpoint)

    monkeypatch.setattr(checkpoints_module, "mark_complete", killed_on_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        keeping_one_checkpoint(tmp_path, tokenizer, max_steps=2).train()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path, tokenizer):
    keeping_one_checkpoint(tmp_path, tokenizer, max_steps=3).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    assert is_complete(tmp_path / "checkpoint-3")


def test_resume_without_any_complete_checkpoint_says_so(tmp_path, tokenizer):
    trainer = MinorSFTTrainer(
        make_model(tokenizer),
        args=cpu_args(tmp_path, max_steps=1),
        train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*Drop `resume_from_checkpoint`"):
        trainer.train(resume_from_checkpoint="latest")


def test_run_killed_during_the_precompute_leaves_no_trusted_cache(
    tmp_path, tiny_model_dir, monkeypatch, count_reference_passes
):
    many = prompt_completion_dataset()
    for _ in range(5):  # 256 examples: the precompute, one example per forward, takes seconds
        many = many.from_dict({k: v + v for k, v in many.to_dict().items()})
    many.to_json(tmp_path / "data" / "train.jsonl")
    recipe = write_recipe(tmp_path, tiny_model_dir, precompute_ref_log_probs=True, precompute_ref_batch_size=1)
    cache = tmp_path / "cache"
    ref_cache = cache / "ref_logps"

    kill_when(recipe, cache, lambda: any(ref_cache.glob(".*.partial")))
    # Only the staging directory of the killed build (and the lock it held) is left, under names no run reads from
    assert all(entry.name.endswith((".partial", ".lock")) for entry in ref_cache.iterdir())

    # The same run again computes the reference log-probs anew, and completes
    monkeypatch.setenv("MINORSFT_TRL_CACHE", str(cache))
    main(*parse_args(["--config", str(recipe), "--output_dir", str(tmp_path / "again")]))
    assert count_reference_passes == ["train"]
    assert len([entry for entry in ref_cache.iterdir() if not entry.name.endswith((".partial", ".lock"))]) == 1


def test_ctrl_c_says_where_the_last_complete_checkpoint_is_and_the_command_that_resumes_it(tmp_path, tiny_model_dir):
    """SIGINT, as Ctrl-C sends it, to a run that has saved checkpoints: exit code 130 and two lines on stderr."""
    recipe = write_recipe(tmp_path, tiny_model_dir, max_steps=500, save_strategy="steps", save_steps=1)
    output_dir = tmp_path / "out"
    # SIGINT as a terminal delivers it, even where the suite itself runs with SIGINT ignored (a shell's background
    # job: its children inherit the ignore, and Python then installs no KeyboardInterrupt handler)
    process = subprocess.Popen(
        command(recipe), env=environment(tmp_path / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while last_complete_checkpoint(str(output_dir)) is None:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    last = process.stderr.read().strip().splitlines()[-2:]
    assert last[0].startswith("Interrupted at step ") and "The last complete checkpoint is " in last[0], last
    checkpoint = last[0].split("The last complete checkpoint is ")[1].split(";")[0]
    assert is_complete(checkpoint) and Path(checkpoint).parent == output_dir
    assert last[1] == f"  python -m minorsft_trl.scripts.minor_sft --config {recipe} --resume_from_checkpoint true"
