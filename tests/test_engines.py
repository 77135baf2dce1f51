"""The engines users scale out on, on a CPU: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (the shipped configs, launched with
`--num_processes 2 --mixed_precision no` and `use_cpu: true`) and FSDP2 (over the CPU device mesh: accelerate runs FSDP
on accelerators only), each against one process holding the same global batch.

One launch per engine runs every cell of the matrix (`tests/engine_worker.py`): {the policy with its adapters
disabled (LoRA, QLoRA), the frozen copy of full fine-tuning, an explicit `ref_model`} x {on the fly, precomputed}, the
KL losses, gradient accumulation, a checkpoint resumed, trained base biases, the drift measures, a reference that is
not the policy's starting point, and activation checkpointing.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from test_distributed import REPO, launch
from tiny import QUANTIZABLE_WIDTHS, make_model, write_recipe

from minorsft_trl.checkpoints import MANIFEST

pytestmark = pytest.mark.slow

ENGINES = {  # name: (accelerate config, FSDP version switched on over the CPU mesh)
    "ddp": ("ddp", None),
    "zero2": ("zero2", None),
    "zero3": ("zero3", None),
    "fsdp2": ("ddp", 2),
}


def cell(name: str, reference: str, loss_type: str = "minor_sft", precompute: bool = False, **options) -> dict:
    return dict(name=name, reference=reference, loss_type=loss_type, precompute=precompute, **options)


CELLS = [
    *(
        cell(f"{reference}, {'precomputed' if precompute else 'on the fly'}", reference, precompute=precompute)
        for reference in ("adapters", "copy", "explicit")
        for precompute in (False, True)
    ),
    *(
        cell(f"{loss}, {reference}", reference, loss)
        for loss in ("sft_kl", "asft")
        for reference in ("adapters", "copy")
    ),
    # The KL anchor precomputed as the reference's top-k (refused under ZeRO-3, whose LM head it cannot read whole).
    # Its policy side takes the log-normaliser from the answer token's log-prob (`topk_anchor.topk_kl`), whose
    # float32 rounding (5e-7 at log p = -5.6) the anchor's gradient `q - p`, small near the reference and weighted by
    # kl_coef 100 here, carries into the update: 1.3e-5 of its norm between one and two processes
    *(
        cell(f"{loss}, {reference}, precomputed", reference, loss, precompute=True, update_tolerance=1e-4)
        for loss, reference in (("sft_kl", "copy"), ("sft_kl", "adapters"))
    ),
    cell("copy, accumulation 2", "copy", gradient_accumulation_steps=2),
    *(
        cell(
            f"QLoRA, {'precomputed' if precompute else 'on the fly'}",
            "adapters",
            precompute=precompute,
            model="quantizable",
            four_bit=True,
        )
        for precompute in (False, True)
    ),  # fmt: skip
    # Qwen2's q/k/v biases trained besides the adapter: kept at their starting values for every reference pass
    cell("adapters, trained biases", "adapters", model="qwen2", lora_bias="all"),
    cell("adapters, resumed", "adapters", resume=True),
    # 40 prompts make drift batches of 16, 16 and 8 rows: one process scores two of them, the other one and a spare
    cell("adapters, drift measures", "adapters", drift=True),
    cell("full fine-tuning without a reference, drift measures", "copy", "nll", drift=True),
    cell("copy, broken reference", "copy", broken_reference=True),
    cell("copy, broken reference, precomputed", "copy", precompute=True, broken_reference=True),
]
# Activation checkpointing (TRL's default; the QLoRA recipes set it): these cells again with it, each compared with
# itself without it in the same launch; under ZeRO-3 with no parameter kept whole between its uses, as a real model's
# weight matrices are (the tiny models' all stay whole by default). The policy runs before training in each (the
# precompute; on the fly, the drift measures' samples), through an engine of its own under ZeRO-3
CHECKPOINTED = ", activation checkpointing"
CELLS += [
    {**c, "name": c["name"] + CHECKPOINTED, "activation_checkpointing": True, "partitioned": True}
    for c in CELLS
    if c["name"] in ("adapters, drift measures", "adapters, precomputed", "QLoRA, precomputed")
]
# The update of each weight tensor equals one process's within this fraction of its norm (float32 sums in another
# order; the largest seen is 1.7e-6, `asft` at learning rate 100), plus 4 roundings of the weight in its own dtype
# (QLoRA trains its adapters in bfloat16, where DeepSpeed's optimizer step rounds otherwise than torch's)
UPDATE_TOLERANCE = 1e-5
ROUNDINGS = 4
# With activation checkpointing against without it, in one launch: the same computations (bit for bit on this CPU)
CHECKPOINTING_TOLERANCE = 1e-6


def run_cells(out_dir: Path, model_dirs: dict[str, str], engine: str | None) -> Path:
    config, fsdp_version = ENGINES[engine] if engine else ("single_gpu", None)
    processes = 2 if engine else 1
    # 8 examples, 2 steps: 2 per batch on each of 2 processes, 4 on one; halved with gradient accumulation
    cells = []
    # Not run in one process: the broken references (stopped in every engine's run, nothing to compare with) and the
    # checkpointed cells (compared with their cells without checkpointing)
    not_alone = ("broken_reference", "activation_checkpointing")
    for c in [c for c in CELLS if processes == 2 or not any(c.get(key) for key in not_alone)]:
        accumulation = c.get("gradient_accumulation_steps", 1)
        if c.get("four_bit") and processes == 1:
            # bitsandbytes' 4-bit CPU kernels round differently for other batch shapes (the second step's deviation
            # moved by 0.2% on an AVX512-BF16 CPU): one process accumulates the two processes' micro-batches
            accumulation = 2
        per_process = 4 // processes // accumulation
        cells.append(
            {
                **c,
                "per_device_train_batch_size": per_process,
                "gradient_accumulation_steps": accumulation,
                "model_dir": model_dirs[c.get("model", "llama")],
            }
        )
    out_dir.mkdir(parents=True)
    drift = dict(drift_prompts=str(out_dir / "prompts.jsonl"), drift_texts=str(out_dir / "texts.jsonl"))
    Path(drift["drift_prompts"]).write_text("".join(json.dumps({"prompt": f"{i} + {i} ="}) + "\n" for i in range(40)))
    Path(drift["drift_texts"]).write_text(
        "".join(json.dumps({"text": f"the number {i} is {'odd' if i % 2 else 'even'}"}) + "\n" for i in range(11))
    )
    cells = [{**c, **(drift if c.get("drift") else {})} for c in cells]
    (out_dir / "cells.json").write_text(json.dumps(cells))
    arguments = [model_dirs["llama"], out_dir, out_dir / "cells.json", *([fsdp_version] if fsdp_version else [])]
    launch(REPO / "tests" / "engine_worker.py", *arguments, num_processes=processes, config=config)
    return out_dir


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer, tiny_model_dir) -> dict[str, str]:
    """The tiny Llama (no biases), a tiny Qwen2 (q/k/v biases) and a Llama of widths bitsandbytes' 4-bit CPU paths
    accept, saved."""
    dirs = {"llama": tiny_model_dir}
    for name, options in (("qwen2", dict(architecture="qwen2")), ("quantizable", QUANTIZABLE_WIDTHS)):
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        make_model(tokenizer, seed=0, **options).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


@pytest.fixture(scope="session")
def launched(tmp_path_factory, model_dirs):
    """The output folder of each engine's launch (`None`: one process), launched the first time a test asks for it.
    Kept for the session, not the module: a module-scoped launch is torn down and launched again whenever a test of
    another module runs between two of this module's."""
    out_dirs = {}

    def out_dir(engine: str | None) -> Path:
        if engine not in out_dirs:
            out_dirs[engine] = run_cells(tmp_path_factory.mktemp("engines") / (engine or "one"), model_dirs, engine)
        return out_dirs[engine]

    return out_dir


@pytest.fixture
def one_process(launched) -> Path:
    return launched(None)


@pytest.fixture(params=list(ENGINES))
def engine(request, launched) -> tuple[str, Path]:
    return request.param, launched(request.param)


def results(out_dir: Path, name: str) -> tuple[dict, dict]:
    return json.loads((out_dir / f"{name}.json").read_text()), torch.load(out_dir / f"{name}.pt")


def precomputed_anchor(c: dict) -> bool:
    return c["precompute"] and c["loss_type"] in ("sft_kl", "asft")


def checked_apart(c: dict) -> bool:
    return any(c.get(key) for key in ("broken_reference", "lora_bias", "activation_checkpointing")) or (
        precomputed_anchor(c)
    )


@pytest.mark.parametrize("cell", [c for c in CELLS if not checked_apart(c)], ids=lambda c: c["name"])
def test_each_engine_trains_as_one_process(engine, one_process, cell):
    assert_trains_as_one_process(*engine, one_process, cell)


@pytest.mark.parametrize("cell", [c for c in CELLS if precomputed_anchor(c)], ids=lambda c: c["name"])
def test_the_precomputed_kl_anchor_trains_as_one_process_or_is_refused_under_zero3(engine, one_process, cell):
    name, out_dir = engine
    if name == "zero3":
        report = json.loads((out_dir / f"{cell['name']}.json").read_text())
        assert "under DeepSpeed ZeRO-3: the precomputed KL anchor reads the LM head" in report["refused"]
    else:
        assert_trains_as_one_process(name, out_dir, one_process, cell)


@pytest.mark.parametrize("cell", [c for c in CELLS if c.get("activation_checkpointing")], ids=lambda c: c["name"])
def test_each_engine_trains_with_activation_checkpointing_as_without_it(engine, one_process, cell):
    """The layers' activations recomputed in the backward, under ZeRO-3 from parameters gathered again: the same
    losses, deviation and updates as the same cell without checkpointing in the same launch (bit for bit here), and
    so as one process. ZeRO-3 crashed here (`CheckpointError`) once the policy had run through an engine before
    training (the precompute, the drift measures' samples: see `minorsft_trl.engines.forget_backward_functions`)."""
    name, out_dir = engine
    without = cell["name"].removesuffix(CHECKPOINTED)
    (report, weights), (without_report, without_weights) = results(out_dir, cell["name"]), results(out_dir, without)
    assert "error" not in report, report["error"]
    assert report["checkpointed_forwards"] > 0 and without_report["checkpointed_forwards"] == 0
    if name == "zero3":  # no parameter kept whole between its uses: each gathered again for the recomputation
        assert report["persistent_parameters"] == 0 and without_report["persistent_parameters"] > 0
    assert report["losses"] == pytest.approx(without_report["losses"], rel=CHECKPOINTING_TOLERANCE)
    assert report["deviation"] == pytest.approx(without_report["deviation"], rel=CHECKPOINTING_TOLERANCE, abs=1e-9)
    assert_same_updates(weights, without_weights, CHECKPOINTING_TOLERANCE, roundings=1)
    assert_trains_as_one_process(name, out_dir, one_process, cell, expected_name=without)


def assert_trains_as_one_process(
    name: str, out_dir: Path, one_process: Path, cell: dict, expected_name: str | None = None
) -> None:
    """`cell` trained under engine `name` as one process trained it (or the cell `expected_name`)."""
    report, weights = results(out_dir, cell["name"])
    expected_report, expected_weights = results(one_process, expected_name or cell["name"])
    assert report["world_size"] == 2 and "error" not in report, report
    if name == "ddp":  # real processes over gloo: without `use_cpu` each would train alone (refused, below)
        assert report["distributed_type"] == "MULTI_CPU" and report["engine"] == "DistributedDataParallel"
    elif name.startswith("zero"):
        assert report["distributed_type"] == "DEEPSPEED" and report["engine"] == "DeepSpeedEngine"
        assert report["zero_stage"] == int(name[-1])
    else:
        assert report["distributed_type"] == "FSDP" and report["engine"].startswith("FSDP")  # fully_shard's classes
    # The reference check ran and passed: the policy starts at its reference
    if cell["loss_type"] != "nll":
        assert report["deviation"][0] == pytest.approx(0.0, abs=1e-6) and len(report["deviation"]) == 2
        assert abs(report["deviation"][1]) > 1e-4, "the second step must be away from the reference"
    # The precompute: 4 batches, 2 reference forwards on each process
    assert report["precompute_forwards"] == ([2, 2] if cell["precompute"] else [0, 0])
    assert report["losses"] == pytest.approx(expected_report["losses"], rel=1e-4)
    # The deviation is a difference of per-token log-probs of about -5 summed in float32 over another batch layout: its
    # absolute noise (layout noise, README "The reference": up to 3.8e-6 per example) does not shrink with its size
    assert report["deviation"] == pytest.approx(expected_report["deviation"], rel=1e-4, abs=1e-6)
    if cell.get("drift"):  # at steps 0, 1, 2: 0 before training, then equal to one process's
        assert [row[0] for row in report["drift"]] == [0, 1, 2] and report["drift"][-1][1] > 1e-6
        assert report["drift"][0][1] == pytest.approx(0.0, abs=1e-7)
        for row, expected_row in zip(report["drift"], expected_report["drift"], strict=True):
            for value, expected in zip(row, expected_row, strict=True):  # `None`: not measured in this run
                assert value == (expected if expected is None else pytest.approx(expected, rel=1e-4, abs=1e-7))
    if cell["loss_type"] in ("asft", "sft_kl"):
        assert report["kl"][1] * 100.0 > 1e-3, "the KL anchor must be at work"
        assert report["kl"] == pytest.approx(expected_report["kl"], rel=1e-3, abs=1e-9)
    # The update of every trainable weight, against one process holding the same global batch
    assert_same_updates(weights, expected_weights, cell.get("update_tolerance", UPDATE_TOLERANCE), ROUNDINGS)
    assert any(
        update.abs().max() > 0 for update in (weights["after"][k] - weights["before"][k] for k in weights["after"])
    )


def assert_same_updates(weights: dict, expected_weights: dict, tolerance: float, roundings: int) -> None:
    """The same weights before training, and each one's update equal to the expected update within `tolerance` of
    its norm plus `roundings` roundings of the weight in its own dtype."""
    assert weights["after"].keys() == expected_weights["after"].keys()
    for key, after in weights["after"].items():
        update, expected_update = (
            after - weights["before"][key],
            expected_weights["after"][key] - weights["before"][key],
        )
        torch.testing.assert_close(weights["before"][key], expected_weights["before"][key], rtol=0, atol=0)
        error = (update - expected_update).float().norm().item()
        rounding = roundings * torch.finfo(after.dtype).eps * after.float().norm().item()
        bound = tolerance * expected_update.float().norm().item() + rounding
        assert error <= bound, f"{key}: the update is off by {error:.3g} (bound {bound:.3g})"


def test_trained_base_biases_train_as_one_process_or_are_refused_where_the_engine_shards_them(engine, one_process):
    """The starting values of the base biases an adapter trains are swapped in for each reference pass: a sharded
    parameter (ZeRO-3, FSDP) cannot be swapped, so the trainer refuses before training, saying what works instead."""
    name, out_dir = engine
    cell = next(c for c in CELLS if c.get("lora_bias"))
    report = json.loads((out_dir / f"{cell['name']}.json").read_text())
    if name in ("ddp", "zero2"):
        assert_trains_as_one_process(name, out_dir, one_process, cell)
    else:
        assert "under FSDP or ZeRO-3 they are sharded and cannot be swapped. Set `bias='none'`" in report["refused"]


# A part of a checkpoint that each process writes itself, with `{}` for its rank
PER_PROCESS_PART = {
    "ddp": "rng_state_{}.pth",
    "zero2": "global_step1/zero_pp_rank_{}_mp_rank_00_optim_states.pt",
    "zero3": "global_step1/zero_pp_rank_{}_mp_rank_00_model_states.pt",
    "fsdp2": "pytorch_model_fsdp_0/__{}_0.distcp",
}


def test_each_engine_writes_a_checkpoint_complete_with_every_processs_part(engine):
    """The checkpoint the resumed cell continued from (to the one-process weights, above): marked complete only once
    both processes wrote their parts, the engine's and one that process 1 writes late."""
    name, out_dir = engine
    manifest = json.loads((out_dir / "adapters, resumed" / "checkpoint-1" / MANIFEST).read_text())
    for rank in range(2):
        assert PER_PROCESS_PART[name].format(rank) in manifest, sorted(manifest)
    assert "late-part-rank1.bin" in manifest, "marked complete before process 1 finished"


@pytest.mark.parametrize("precomputed", [False, True], ids=["on the fly", "precomputed"])
def test_each_engine_stops_on_a_reference_that_is_not_the_policys_start(engine, precomputed):
    _, out_dir = engine
    name = "copy, broken reference" + (", precomputed" if precomputed else "")
    report, _ = results(out_dir, name)
    assert "Reference check failed: the reference is a frozen copy of the policy" in report["error"]
    assert report["losses"] == []


def test_a_separate_reference_is_partitioned_under_zero3_and_sharded_under_fsdp2(engine):
    name, out_dir = engine
    report, _ = results(out_dir, "copy, on the fly")
    (held, whole, shards), (held_other, whole_other, shards_other) = report["reference_bytes"]
    assert whole == whole_other
    if name in ("ddp", "zero2"):  # whole on every process (TRL's `prepare_deepspeed` runs ZeRO-2's at stage 0)
        assert held == held_other == whole and shards == 0
    elif name == "zero3":
        # Each process keeps its half of every parameter; DeepSpeed keeps parameters below its persistence threshold
        # (1e5 values) whole as well once used, which on the tiny model is all of them
        assert shards == shards_other == pytest.approx(whole / 2, rel=0.01)
        assert held == held_other == shards + whole
    else:
        assert held + held_other == whole and max(held, held_other) < 0.51 * whole


def test_nothing_of_the_engines_outlives_end(engine):
    """`end` lets go of the engines before it destroys the process group, and the launch lets go of each cell's
    trainer before the next: whatever still holds the group is freed only at interpreter exit (a launched process
    died of SIGABRT once in CI, while earlier cells' engines were still alive)."""
    name, out_dir = engine
    for rank in range(2):
        left = json.loads((out_dir / f"after-end-{rank}.json").read_text())
        assert left == {"ddp_wrappers": 0, "deepspeed_engines": 0, "module_stack": 0}, (name, rank, left)


@pytest.mark.parametrize(
    "config, options, mixed_precision, message",
    [
        ("fsdp", [], "no", r"asks for FSDP, but accelerate runs FSDP on GPUs .* only: here it would run distributed "
         r"type MULTI_CPU.*accelerate_configs/zero3.yaml"),
        ("ddp", ["--use_cpu", "false", "--ddp_backend", "gloo"], "no",
         r"one of 2 launched processes \(WORLD_SIZE=2\), but it trains alone \(world size 2, distributed type NO\)"),
        ("zero3", ["--use_cpu", "false"], "no",
         r"one of 2 launched processes \(WORLD_SIZE=2\), but it trains alone \(world size 1, distributed type "
         r"DEEPSPEED\)"),
        ("zero3", [], None, r"DeepSpeed trains in the accelerate config's mixed_precision='bf16', and the training "
         r"arguments say bf16=False, fp16=False.*Pass `--mixed_precision no`"),
    ],
    ids=["fsdp config on a cpu", "gloo without use_cpu", "zero3 without use_cpu", "zero3 bf16, recipe float32"],
)  # fmt: skip
def test_a_launch_that_would_not_run_as_launched_stops_before_the_output_folder(
    tmp_path, tiny_model_dir, config, options, mixed_precision, message
):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    output = launch(
        REPO / "recipes" / "minor_sft.py", "--config", recipe, *options,
        config=config, mixed_precision=mixed_precision, fails=True,
    )  # fmt: skip
    assert re.search(message, " ".join(output.split())), output[-3000:]
    assert not (tmp_path / "out").exists()
