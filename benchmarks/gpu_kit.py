"""The GPU check on a GPU machine that reaches no package index: a kit of wheels that travels with the working tree.

    make gpu-kit                                          # here, through your pip configuration: .gpu-kit/
    python3 benchmarks/gpu_kit.py run --output "$OUT"     # there: install offline, versions, the check in a time box
    python3 benchmarks/gpu_kit.py run --device cpu ...    # the dry run of the same script on a CPU (a test)

`build` downloads, with `--no-deps`, exactly the wheels that the GPU machine this project is lent lacks (`WHEELS`:
Python 3.12, manylinux x86_64, torch 2.11 built for CUDA 13.0, accelerate 1.15, transformers 5.17; no trl,
datasets, dill, multiprocess or bitsandbytes), each pinned to the version this project's tests pass with, plus this
project's own wheel, into a git-ignored folder. bitsandbytes ships one library per CUDA release (41 MiB in all); the
kit keeps the one the machine's torch loads (`--cuda`, 130 by default) and the CPU one (the dry run's), so that the
kit and the repository travel together within the 64 MiB a call carries. It prints the kit's size and fails if the
kit and the repository's files (tracked, and untracked but not ignored: what travels) pass `LIMIT_MIB`.

`run` installs the kit offline (`pip install --no-index --find-links <kit> --no-deps --target <scratch>`, put first on
`PYTHONPATH`: the kit's versions shadow the machine's), writes the versions it runs with (torch, CUDA, the GPU,
bitsandbytes and every package the check imports, each with where it was imported from and any requirement the
machine leaves unmet), then runs `benchmarks/gpu_check.py` within what is left of the time box. The check writes each
part's result as soon as it is known, so a run cut by the box still returns numbers. What comes back: `versions.txt`,
`gpu_check_<device>.json`, `gpu_check_<device>.md` and `gpu_check.log` in `--output`.

This file needs only the standard library: `run` starts before anything is installed.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / ".gpu-kit"
LIMIT_MIB = 60
# What the GPU machine lacks, pinned to what this project's tests pass with, and why the check needs it
WHEELS = {
    "transformers": ("5.24.0", "the machine's 5.17 is below this project's >=5.19; 5.24 is the newest release that "
                     "accepts the machine's huggingface_hub 1.33 (5.25 asks for >=2.4)"),
    "trl": ("1.16.0", "SFTTrainer, which MinorSFTTrainer subclasses"),
    "datasets": ("5.2.0", "TRL's data pipeline"),
    "dill": ("0.4.1", "imported by datasets"),
    "multiprocess": ("0.70.19", "imported by datasets"),
    "peft": ("0.21.2", "LoRA; the machine has peft, but its version is recorded nowhere"),
    "bitsandbytes": ("0.50.2", "4-bit NF4 (QLoRA), slimmed to the CUDA release of the machine's torch"),
}  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip
# Printed with their versions and origins (the first eight come with the machine); the kit's are checked for unmet
# requirements
SHOWN = ["torch", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "numpy", "pyarrow", "fsspec",
         *WHEELS, "minorsft_trl"]  # fmt: skip


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def download(requirement: str, kit: Path, python_version: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
         python_version, "--implementation", "cp", *(f"--platform={tag}" for tag in PLATFORMS), "--dest", str(kit),
         requirement],
        check=True,
    )  # fmt: skip


def slim_bitsandbytes(wheel: Path, cuda: str) -> list[str]:
    """Rewrite `wheel` without the CUDA, ROCm and XPU libraries other than `libbitsandbytes_cuda<cuda>.so` (its
    RECORD without their lines, every other file and hash as they were); the names of the libraries kept."""
    keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}

    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("libbitsandbytes_") and base.endswith(".so") and base not in keep

    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        libraries = [name for name in source.namelist() if name.endswith(".so")]
        if not any(name.endswith(f"libbitsandbytes_cuda{cuda}.so") for name in libraries):
            raise SystemExit(f"gpu_kit: {wheel.name} has no libbitsandbytes_cuda{cuda}.so; it has {libraries}.")
        for info in source.infolist():
            if dropped(info.filename):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
            target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    slimmed.replace(wheel)
    return sorted(name.rsplit("/", 1)[-1] for name in libraries if not dropped(name))


def travelling_bytes() -> int:
    """The size of what travels with a call besides the kit: the repository's tracked files and its untracked files
    that git does not ignore."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    return sum((REPO / name).stat().st_size for name in names if name and (REPO / name).is_file())


def build(cli: argparse.Namespace) -> int:
    kit = Path(cli.kit)
    kit.mkdir(parents=True, exist_ok=True)
    for stale in kit.glob("*.whl"):
        stale.unlink()
    for name, (version, _) in WHEELS.items():
        print(f"downloading {name}=={version} for Python {cli.python_version} ...", flush=True)
        download(f"{name}=={version}", kit, cli.python_version)
    print("building minorsft_trl's wheel ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(kit), str(REPO)], check=True
    )
    (bitsandbytes,) = kit.glob("bitsandbytes-*.whl")
    kept = slim_bitsandbytes(bitsandbytes, cli.cuda)
    why = {name: reason for name, (_, reason) in WHEELS.items()}
    why["minorsft_trl"] = "this project"
    why["bitsandbytes"] += f" (kept: {', '.join(kept)})"
    wheels = sorted(kit.glob("*.whl"))
    kit_bytes = sum(wheel.stat().st_size for wheel in wheels)
    repository_bytes = travelling_bytes()
    for wheel in wheels:
        print(f"{mib(wheel.stat().st_size):>10}  {wheel.name}: {why[distribution_name(wheel)]}")
    total = kit_bytes + repository_bytes
    print(
        f"kit {mib(kit_bytes)} in {kit}; with the repository's files ({mib(repository_bytes)}) {mib(total)} travel, "
        f"limit {LIMIT_MIB} MiB."
    )
    if total > LIMIT_MIB * 2**20:
        print(f"gpu_kit: {mib(total)} would travel, over the {LIMIT_MIB} MiB limit.", file=sys.stderr)
        return 1
    return 0


def distribution_name(wheel: Path) -> str:
    """`bitsandbytes` of `bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl` (names normalised as in PEP 503)."""
    return re.sub(r"[-_.]+", "_", wheel.name.split("-", 1)[0]).lower()


VERSIONS = textwrap.dedent(
    """
    import importlib, importlib.metadata as metadata, os, platform, sys
    from packaging.requirements import Requirement
    print(f"python {platform.python_version()} ({sys.executable})")
    shown, checked = sys.argv[1].split(","), sys.argv[2].split(",")
    for name in shown:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            print(f"{name}: not importable: {type(error).__name__}: {str(error)[:300]}")
            continue
        print(f"{name} {getattr(module, '__version__', '?')} ({os.path.dirname(module.__file__)})")
    import torch
    print(f"torch built for CUDA {torch.version.cuda}; CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        print(f"GPU: {torch.cuda.get_device_name(0)}, {memory:.0f} GiB")
    for name in checked:
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                found = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                print(f"unmet: {name} needs {requirement}, not installed")
                continue
            if not requirement.specifier.contains(found, prereleases=True):
                print(f"unmet: {name} needs {requirement}, found {found}")
    """
)


def run(cli: argparse.Namespace) -> int:
    begin = time.monotonic()
    output = Path(cli.output)
    output.mkdir(parents=True, exist_ok=True)
    wheels = sorted(Path(cli.kit).glob("*.whl"))
    if not wheels:
        print(f"gpu_kit: no wheels in {cli.kit}; run `make gpu-kit` where pip reaches an index.", file=sys.stderr)
        return 2
    site = Path(cli.site or tempfile.mkdtemp(prefix="gpu-kit-site-"))
    pinned = [f"{wheel.name.split('-')[0]}=={wheel.name.split('-')[1]}" for wheel in wheels]
    print(f"installing {' '.join(pinned)} into {site} ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(cli.kit), "--no-deps",
         "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *pinned],
        check=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TQDM_DISABLE": "1",
    }
    shown, checked = ",".join(SHOWN), ",".join([*WHEELS, "minorsft_trl"])
    versions = subprocess.run(
        [sys.executable, "-c", VERSIONS, shown, checked], env=env, capture_output=True, text=True, check=True, cwd=site
    ).stdout
    (output / "versions.txt").write_text(versions)
    print(versions, flush=True)
    time_box = cli.time_box - (time.monotonic() - begin)
    print(f"the GPU check, {time_box:.0f} s left of the {cli.time_box:.0f} s box ...", flush=True)
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", cli.device, "--output",
               str(output / f"gpu_check_{cli.device}.json"), "--time_box", f"{time_box:.0f}"]  # fmt: skip
    with open(output / "gpu_check.log", "w") as log:
        check = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in check.stdout:
            sys.stdout.write(line)
            log.write(line)
            log.flush()
        returncode = check.wait()
    print(f"gpu_kit: the call took {time.monotonic() - begin:.0f} s (install, versions and the check).")
    return returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", default=str(KIT), help="the folder of wheels (default: .gpu-kit/)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    build_parser = verbs.add_parser("build", help="download the wheels the GPU machine lacks into --kit")
    build_parser.add_argument("--python_version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    build_parser.add_argument("--cuda", default="130", help="the CUDA release its torch was built for (default: 130)")
    run_parser = verbs.add_parser("run", help="install --kit offline and run the GPU check in a time box")
    run_parser.add_argument("--output", required=True, help="where the results go (on the lent machine: $OUT)")
    run_parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    run_parser.add_argument("--time_box", type=float, default=420, help="seconds for the whole call (default: 420)")
    run_parser.add_argument("--site", help="where the kit is installed (default: a new temporary folder)")
    cli = parser.parse_args()
    return build(cli) if cli.verb == "build" else run(cli)


if __name__ == "__main__":
    raise SystemExit(main())
