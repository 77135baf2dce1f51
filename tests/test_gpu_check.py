"""`make gpu-check` on a CPU: the same script as on a GPU, with a tiny shape, so every line of it but the device's is
run where there is no GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def test_the_gpu_check_runs_on_a_cpu_with_a_tiny_shape(tmp_path):
    output = tmp_path / "gpu_check_cpu.json"
    run = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--output", output], env=ENV, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads(output.read_text())
    modes = {result["mode"]: result for result in results["costs"].values()}
    assert set(modes) == {
        "sft", "minor_sft adapter-disabled", "minor_sft separate copy", "minor_sft precomputed", "minor_sft default"
    }  # fmt: skip
    assert all(result["step_seconds"] > 0 and result["peak_rss_mb"] > 0 for result in modes.values())
    # The default precomputes (one pass, timed apart); the on-the-fly modes do not
    assert modes["minor_sft default"]["precompute_seconds"] > 0 and not modes["sft"]["precompute_seconds"]
    assert 0 <= results["layout"]["layout_noise"] <= results["layout"]["tolerance"]
    assert results["recipe"]["steps"] == 2 and abs(results["recipe"]["first_deviation"]) <= 1e-4
    table = output.with_suffix(".md").read_text()
    assert table.startswith("GPU check on") and "minorsft-trl train" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs the check itself")
def test_the_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, SCRIPT, "--output", tmp_path / "x.json"], env=ENV, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 2 and len(run.stdout.strip().splitlines()) == 1 and "no CUDA GPU" in run.stdout
    assert not (tmp_path / "x.json").exists()
