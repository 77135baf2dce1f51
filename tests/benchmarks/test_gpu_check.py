"""The GPU check on a CPU: the kit's dry run (the wheels downloaded for this Python, installed offline into a scratch
folder that shadows the environment, the check in its time box with a tiny shape of the same architecture), so that
every line of it but the device's runs where there is no GPU."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "benchmarks" / "gpu_kit.py"
CHECK = REPO / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.mark.slow
def test_the_kit_dry_run_installs_offline_and_runs_the_check_on_a_cpu(tmp_path):
    kit, site, output = tmp_path / "kit", tmp_path / "site", tmp_path / "out"
    build = subprocess.run(
        [sys.executable, KIT, "--kit", kit, "build", "--python_version", PYTHON], capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
    assert "limit 60 MiB" in build.stdout.splitlines()[-1]
    (bitsandbytes,) = kit.glob("bitsandbytes-*.whl")
    libraries = {Path(name).name for name in zipfile.ZipFile(bitsandbytes).namelist() if name.endswith(".so")}
    assert libraries == {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"}

    run = subprocess.run(
        [sys.executable, KIT, "--kit", kit, "run", "--device", "cpu", "--output", output, "--site", site,
         "--time_box", "600"],
        env=ENV, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert sorted(path.name for path in output.iterdir()) == [
        "gpu_check.log", "gpu_check_cpu.json", "gpu_check_cpu.md", "versions.txt"
    ]  # fmt: skip
    # Every package of the kit is imported from the kit, not from the environment it runs in
    versions = (output / "versions.txt").read_text()
    for name in ("transformers", "trl", "datasets", "dill", "multiprocess", "peft", "bitsandbytes", "minorsft_trl"):
        assert f"({site}/{name})" in versions, versions
    assert "unmet" not in versions and "not importable" not in versions, versions

    results = json.loads((output / "gpu_check_cpu.json").read_text())
    assert results["cut"] == [] and results["failed"] == {}
    modes = results["step times"]
    assert set(modes) == set(results["memory"]) == {
        "sft", "minor_sft adapter-disabled", "minor_sft separate copy", "minor_sft precomputed", "minor_sft default"
    }  # fmt: skip
    assert all(modes[mode]["step_seconds"] > 0 and results["memory"][mode]["peak_rss_mb"] > 0 for mode in modes)
    # The default precomputes (one pass, timed apart); the on-the-fly modes do not
    assert modes["minor_sft default"]["precompute_seconds"] > 0 and not modes["sft"]["precompute_seconds"]
    assert 0 <= results["layout"]["layout_noise"] <= results["layout"]["tolerance"]
    assert results["recipe"]["steps"] == 2 and abs(results["recipe"]["first_deviation"]) <= 1e-4
    table = (output / "gpu_check_cpu.md").read_text()
    assert table.startswith("GPU check on") and "minorsft-trl train" in table and "Cut by" not in table


def test_a_part_past_the_time_box_is_cut_and_said_and_the_parts_before_it_are_kept(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(CHECK.parent))
    import gpu_check

    output, written_before = tmp_path / "gpu_check_cpu.json", []

    def past_its_timeout(timeout):  # as `run_worker` ends a worker that runs past what is left of the box
        written_before.append(json.loads(output.read_text()))
        time.sleep(timeout)
        raise subprocess.TimeoutExpired("a worker", timeout)

    def parts(device, spec, config):
        yield [("model", lambda timeout: {"device_name": "a CPU", "num_parameters": 1e6})]
        yield [("layout", lambda timeout: {"layout_noise": 0.0, "tolerance": 0.1})]
        yield [("step times", past_its_timeout)]
        yield [("recipe", lambda timeout: {"steps": 2})]

    monkeypatch.setattr(gpu_check, "parts", parts)
    assert not gpu_check.check("cpu", output, time_box=0.5)
    # Each part's result is on disk as soon as it is known: a call cut later still returns it
    assert written_before[0]["layout"]["layout_noise"] == 0.0
    results = json.loads(output.read_text())
    assert results["model"]["device_name"] == "a CPU" and results["layout"]["layout_noise"] == 0.0
    assert results["cut"] == ["step times", "recipe"] and results["failed"] == {}
    table = output.with_suffix(".md").read_text()
    assert "| sft | cut by the time box |" in table and "layout noise (largest" in table
    assert "Cut by the time box: step times, recipe." in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU runs the check itself")
def test_the_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, CHECK, "--output", tmp_path / "x.json"], env=ENV, capture_output=True,
                         text=True)  # fmt: skip
    assert run.returncode == 2 and len(run.stdout.strip().splitlines()) == 1 and "no CUDA GPU" in run.stdout
    assert not (tmp_path / "x.json").exists()
