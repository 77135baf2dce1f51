"""`minorsft-trl`, the console command: from a wheel installed into a fresh virtual environment and run outside the
repository (the packaged recipes listed, copied, trained from), and its argument handling in process."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_distributed import free_port
from tiny import prompt_completion_dataset, write_recipe

from minorsft_trl.cli import command as cli
from minorsft_trl.cli import packaged

REPO = Path(__file__).resolve().parents[2]
RECIPE = "SmolLM2-135M-Instruct/minor_sft/config_lora"  # the embedded model; its BIG-bench data is swapped below
SMALL_RUN = [
    "--max_train_examples", "8", "--per_device_train_batch_size", "2", "--max_length", "128",
    "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1",
]  # fmt: skip


class Venv:
    def __init__(self, root: Path):
        self.root = root
        self.python = root / "bin" / "python"
        self.command = root / "bin" / "minorsft-trl"
        self.site_packages = Path(
            self.run(self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
        )

    def run(self, *args, cwd=None, check=True) -> subprocess.CompletedProcess:
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        result = subprocess.run(list(map(str, args)), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        return result


@pytest.fixture(scope="session")
def venv(tmp_path_factory) -> Venv:
    """The wheel of this checkout (built from a clean copy), installed with `--no-deps` into a new virtual environment;
    the heavy dependencies are this environment's, by a `.pth` line (which does not run this environment's own `.pth`
    files: the editable install of the repository is not seen there)."""
    root = tmp_path_factory.mktemp("cli")
    ignore = shutil.ignore_patterns(
        ".*", "outputs", "build", "dist", "*.egg-info", "__pycache__", "tests", "benchmarks"
    )
    shutil.copytree(REPO, root / "source", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Without PYTHONPATH, as the venv runs: a checkout on it (with its egg-info) reads as minorsft_trl installed there
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", root / "wheels",
                    root / "source"], env=env, check=True)  # fmt: skip
    (wheel,) = (root / "wheels").glob("minorsft_trl-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    subprocess.run([*pip, "--python", root / "venv" / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
                    wheel], env=env, check=True)  # fmt: skip
    venv = Venv(root / "venv")
    (venv.site_packages / "_minorsft_trl_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """8 prompt-completion rows as `train.jsonl` and `test.jsonl` (the recipe's `bigbench:` task is 358 MB)."""
    for split in ("train", "test"):
        prompt_completion_dataset().to_json(tmp_path / "data" / f"{split}.jsonl")
    return tmp_path / "data"


def test_the_wheel_ships_the_command_the_script_the_recipes_and_the_accelerate_configs(venv, tmp_path):
    where = "import importlib.util; print(importlib.util.find_spec('minorsft_trl').origin)"  # without importing it
    origin = venv.run(venv.python, "-c", where, cwd=tmp_path).stdout
    package = venv.site_packages / "minorsft_trl"
    assert Path(origin.strip()) == package / "__init__.py", "minorsft_trl is imported from the repository"
    for path in REPO.glob("recipes/*/*/config_*.yaml"):
        assert (package / path.relative_to(REPO)).read_text() == path.read_text()
    for path in [*REPO.glob("accelerate_configs/*.yaml"), *REPO.glob("recipes/chat_templates/*.jinja")]:
        assert (package / path.relative_to(REPO)).is_file(), path
    assert (package / "scripts" / "minor_sft.py").is_file()

    listing = venv.run(venv.command, "recipes", cwd=tmp_path).stdout
    names = [path.relative_to(REPO / "recipes").with_suffix("").as_posix() for path in REPO.glob("recipes/*/*/*.yaml")]
    assert len(names) >= 9 and all(name in listing for name in names), listing
    assert "ddp, fsdp, single_gpu, zero2, zero3" in listing


def test_copy_a_packaged_recipe_and_train_from_it_outside_the_repository_with_a_packaged_accelerate_config(
    venv, tmp_path, tiny_data
):
    """The copy door, trained with an accelerate config by its packaged name (a packaged recipe trained by its name:
    the own-data test below)."""
    venv.run(venv.command, "recipes", "copy", RECIPE, "my_recipe.yaml", cwd=tmp_path)
    assert (tmp_path / "my_recipe.yaml").read_text() == (REPO / "recipes" / f"{RECIPE}.yaml").read_text()
    again = venv.run(venv.command, "recipes", "copy", RECIPE, "my_recipe.yaml", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "exists" in again.stderr

    out = tmp_path / "out"
    venv.run(venv.command, "train", "--config", "my_recipe.yaml", "--accelerate_config", "single_gpu", "--cpu",
             "--mixed_precision", "no", "--dataset_name", tiny_data, "--max_steps", "2", *SMALL_RUN,
             "--output_dir", out, cwd=tmp_path)  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all("deviation" in log for log in state["log_history"][:2])
    assert (out / "adapter_model.safetensors").stat().st_size > 0 and (out / "training_curves.png").is_file()


def test_the_readmes_own_data_command_trains_on_all_of_the_users_data(venv, tmp_path):
    """README, "Train on your own data", from the installed wheel outside the repository (a packaged recipe by its
    name): the packaged recipe's `max_train_examples: 400` belongs to its BIG-bench demo and must not cut the user's
    450 examples."""
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "my_task.jsonl", "w") as file:
        for i in range(450):
            file.write(json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) + "\n")
    out = tmp_path / "out"
    result = venv.run(
        venv.command, "train", "--config", RECIPE, "--dataset_name", "data/my_task.jsonl", "--test_split_size", "0.1",
        "--eval_strategy", "steps", "--eval_steps", "50",
        # A short run: one step, 8 of the held-out examples
        "--max_steps", "1", "--max_eval_examples", "8", "--per_device_train_batch_size", "2", "--max_length", "64",
        "--save_strategy", "no", "--output_dir", out, cwd=tmp_path,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert "held out 45 of its 450 'train' examples as the eval split" in log and "training on the other 405" in log
    assert "The recipe's max_train_examples=400 limits its own data" in log and "of the 405 training" not in log
    assert "max_eval_examples=8: using the first 8 of the 45 eval examples" in log
    # What concerns no user is not in the log: accelerate's defaults, the pin_memory, deprecation and kernel notes
    for noise in ("was set to a value of", "pin_memory", "is_gradient_checkpointing", "gemm_4bit_forward"):
        assert noise not in log, noise
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


def test_listing_the_recipes_loads_neither_torch_nor_transformers():
    """`minorsft-trl recipes` took 5 s, importing the trainer to list file names."""
    code = (
        "import sys; from minorsft_trl import cli; cli.main(['recipes']); "
        "print({'torch', 'transformers'} & sys.modules.keys())"
    )
    listing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert listing.strip().endswith("set()") and "config_lora" in listing


def test_accelerate_configs_by_name_the_packaged_ones_first_then_trl_s():
    ddp = cli.resolve_accelerate_config(["--accelerate_config", "ddp", "--num_processes", "2"])
    assert ddp == ["--config_file", str(packaged.accelerate_configs_dir() / "ddp.yaml"), "--num_processes", "2"]
    trl_config = Path(importlib.util.find_spec("trl").origin).parent / "accelerate_configs" / "fsdp2.yaml"
    assert cli.resolve_accelerate_config(["--accelerate_config", "fsdp2"]) == ["--config_file", str(trl_config)]
    # Without a config, accelerate's own defaults said explicitly (it prints a block of warnings otherwise)
    assert cli.resolve_accelerate_config(["--cpu", "--num_processes", "2"]) == [
        "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"
    ]  # fmt: skip


@pytest.mark.parametrize("config, engine", [("zero3", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_cpu_with_an_engine_config_is_refused_before_launching(config, engine):
    """`accelerate launch --cpu` starts one process without the engine, whatever the config says."""
    with pytest.raises(ValueError, match=rf"--cpu with \S+/{config}.yaml \(distributed_type: {engine}\): accelerate "
                       rf"would start one process without {engine}.*Drop --cpu"):  # fmt: skip
        cli.resolve_accelerate_config(["--accelerate_config", config, "--cpu", "--num_processes", "2"])
    ddp = cli.resolve_accelerate_config(["--accelerate_config", "ddp", "--cpu"])
    assert ddp[-1] == "--cpu"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", RECIPE, "--learnig_rate", "1e-4"], "unrecognized arguments: --learnig_rate"),
        (["train", "--config", "{typo}"], "Unknown arguments from config file: ['--learnig_rate', '0.0001']"),
        (["train", "--config", "Qwen9/minor_sft/config_lora"], "neither a file nor a packaged recipe"),
        (["train", "--config", RECIPE, "--accelerate_config", "ddq"], "This package's configs: ddp, fsdp"),
        (
            ["train", "--config", RECIPE, "--dataset_name", "data/missing.jsonl"],
            "dataset_name 'data/missing.jsonl': no such file or folder",
        ),
        (
            ["train", "--config", RECIPE, "--model_name_or_path", "./models/missing"],
            "model_name_or_path='./models/missing': no such folder",
        ),
        (["train", "--config", "{tab}"], "is not valid YAML at line"),
        (
            ["train", "--config", RECIPE, "--model_name_or_path", "{model}"]
            + ["--lora_target_modules", "q_proj", "v_prj"],
            "LORA target_modules ['v_prj'] match no module of the model, so the adapter would train only ['q_proj']",
        ),
        (["recipes", "copy", "Qwen9/minor_sft/config_lora"], "neither a file nor a packaged recipe"),
        (["recipes", "copy", RECIPE, "{typo}"], "exists: pass --force"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_launched(
    argv, message, tmp_path, capsys, monkeypatch, tiny_model_dir
):
    import accelerate.commands.launch

    monkeypatch.setattr(accelerate.commands.launch, "launch_command", lambda args: pytest.fail("launched"))
    typo = tmp_path / "typo.yaml"
    typo.write_text((REPO / "recipes" / f"{RECIPE}.yaml").read_text() + "learnig_rate: 1.0e-04\n")
    tab = tmp_path / "tab.yaml"
    tab.write_text((REPO / "recipes" / f"{RECIPE}.yaml").read_text() + "\tbeta: 0.1\n")
    assert cli.main([arg.format(typo=typo, tab=tab, model=tiny_model_dir) for arg in argv]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error


def test_train_help_leads_with_the_keys_most_runs_set_and_lists_every_key_on_asking(capsys):
    assert cli.main(["train", "-h"]) == 0
    short = capsys.readouterr().out
    assert short.startswith("usage: minorsft-trl train --config") and len(short.splitlines()) < 120
    for key in ("--model_name_or_path", "--loss_type", "--learning_rate", "--lora_r", "--resume_from_checkpoint"):
        assert key in short
    assert "`true` (or `latest`) takes the last complete checkpoint" in " ".join(short.split())
    assert "--adam_beta1" not in short and "minorsft-trl train -h all" in short
    assert cli.main(["train", "-h", "all"]) == 0
    every = capsys.readouterr().out
    assert "--adam_beta1" in every and "Model, quantization and adapters (TRL's ModelConfig):" in every


def test_the_help_example_of_compare_continues_on_its_next_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--seeds 0 1 2 \\\n      --output_dir compare_out" in capsys.readouterr().out


def test_no_notice_of_an_optional_hub_kernel_on_import():
    """On CPUs with AVX512-BF16 (elsewhere nothing is asked), bitsandbytes asks the Hub for a faster kernel at import
    and, offline, two loggers say it could not: neither reaches the user."""
    code = "import minorsft_trl, peft, bitsandbytes"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "kernels-community" not in run.stderr + run.stdout


def test_train_refuses_an_output_dir_that_holds_a_run_unless_resumed_or_overwritten(tmp_path, capsys, monkeypatch):
    import accelerate.commands.launch

    launched = []
    monkeypatch.setattr(accelerate.commands.launch, "launch_command", lambda args: launched.append(args))
    out = tmp_path / "out"
    (out / "checkpoint-50").mkdir(parents=True)
    (out / "trainer_state.json").write_text("{}")
    argv = ["train", "--config", RECIPE, "--output_dir", str(out)]
    assert cli.main(argv) == 2 and not launched
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert (
        f"output_dir={str(out)!r} holds a run (trainer_state.json, checkpoint-50): pass --resume_from_checkpoint "
        "true to continue it, --overwrite_output_dir true to train over it, or another --output_dir." in error
    )
    assert cli.main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert cli.main([*argv, "--overwrite_output_dir", "true"]) == 0
    assert cli.main(["train", "--config", RECIPE, "--output_dir", str(tmp_path / "fresh")]) == 0
    assert len(launched) == 3


@pytest.mark.parametrize(
    "door, extra",
    [("console", []), ("console", ["--num_processes", "2", "--use_cpu", "true"]), ("module", [])],
    ids=["minorsft-trl train", "minorsft-trl train, 2 processes", "python -m minorsft_trl.scripts.minor_sft"],
)
def test_an_input_error_found_by_the_launched_script_ends_in_one_sentence(tmp_path, tiny_model_dir, door, extra):
    data = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) for i in range(8)]
    lines[3] = '{"prompt": "q3", "completion": Infinity}'
    data.write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path, tiny_model_dir, dataset_name=str(data))
    command = {
        "console": [str(Path(sys.executable).parent / "minorsft-trl"), "train"],
        "module": [sys.executable, "-m", "minorsft_trl.scripts.minor_sft"],
    }[door]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if "--num_processes" in extra:  # a port of its own: another test may be launching processes at the same time
        extra = [*extra, "--main_process_port", str(free_port())]
    run = subprocess.run([*command, "--config", recipe, *extra], env=env, capture_output=True, text=True, timeout=300)
    prog = "minorsft-trl train" if door == "console" else "minor_sft"
    expected = (
        f"{prog}: error: dataset_name '{data}', line 4: `completion` is Infinity, a number JSON writes without "
        'quotes, not text. Quote it (`"completion": "Infinity"`) if it is the text, or remove the record.'
    )
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert run.returncode == 2 and errors and set(errors) == {expected}, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
