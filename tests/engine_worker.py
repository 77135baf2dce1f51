"""Run under `accelerate launch` by tests/test_engines.py: trains the tiny model once per cell of the engine matrix, in
one launch (the start-up, ~5 s of imports per process, is paid once), and writes what each cell saw.

    accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 2 --mixed_precision no \
        tests/engine_worker.py <model_dir> <out_dir> <cells.json> [<fsdp_version>]

With `<fsdp_version>` (2), the launch's data-parallel accelerator is switched to FSDP over the processes' CPU device
mesh (see `with_fsdp_on_the_cpu`).

A cell (JSON): `name`; `reference`: `adapters` (LoRA, the policy with its adapters disabled), `copy` (full fine-tuning,
the frozen copy of the policy) or `explicit` (LoRA, the model's own path as `ref_model_name_or_path`); `loss_type`;
`precompute` (bool); `per_device_train_batch_size`; optionally `model_dir` (another model), `four_bit` (QLoRA: the
model loaded in 4-bit NF4), `lora_bias` (PEFT's `bias`), `drift_prompts` and `drift_texts`
(the drift measures at each step, on these files), `gradient_accumulation_steps`, `resume` (one step with a
checkpoint, where process 1 writes a part of its own 1 s late, then a second trainer resumes from it),
`broken_reference` (the reference's final norm moved by 0.5 before it is prepared: the reference check must stop the
run), `activation_checkpointing` and `partitioned` (under ZeRO-3, no parameter kept whole between its uses: see
`partition_every_parameter`). A cell the trainer refuses reports the reason (`refused`). Every cell trains 2 SGD steps
over the 8 examples without clipping, so the weights after them are a function of the gradients alone.

Written by the main process: `<out_dir>/<name>.json` (the engine, the logged losses, `deviation` and `kl`, each
process's precompute forwards and the bytes of its separate reference (held between forwards, whole, and of its
ZeRO-3 partitions), the main process's forwards under activation checkpointing and, under ZeRO-3, the number of the
policy's parameters kept whole between uses; or the error that stopped the cell) and
`<out_dir>/<name>.pt` (the trainable weights before and after training, whole).
"""

import gc
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, is_deepspeed_available
from peft import LoraConfig
from tiny import cpu_args, prompt_completion_dataset
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoTokenizer, BitsAndBytesConfig, Trainer, modeling_utils
from transformers.integrations import is_deepspeed_zero3_enabled

from minorsft_trl import MinorSFTTrainer
from minorsft_trl.drift.live import drift_log_history
from minorsft_trl.engines import parameter_bytes
from minorsft_trl.reference.precompute import ReferencePrecompute
from minorsft_trl.reference.reference import Reference

# The imports' objects out of the collector's sight: each cell's `train` (accelerate's `free_memory`) and release of
# its engines run a full `gc.collect()`, which walked half a million of them (0.25 s) every time
gc.freeze()

# By this process: reference forwards and reference bytes while the trainer of the current cell is built, forwards run
# under activation checkpointing while it trains
SEEN = {"forwards": 0, "reference_bytes": None, "checkpointed": 0}
BROKEN_REFERENCE = {"on": False}
SAVE_OPTIMIZER = Trainer._save_optimizer_and_scheduler
PRECOMPUTE_BATCH = ReferencePrecompute.batch_reference
LOAD_REFERENCE = Reference.load.__func__
PREPARE_REFERENCE = Reference.prepare
CHECKPOINT = modeling_utils.checkpoint


def counting_checkpoint(*args, **kwargs):
    """transformers' activation checkpointing of one layer's forward (torch's `checkpoint`), counted."""
    SEEN["checkpointed"] += 1
    return CHECKPOINT(*args, **kwargs)


def counting_precompute_batches(self, *args, **kwargs):
    SEEN["forwards"] += 1
    return PRECOMPUTE_BATCH(self, *args, **kwargs)


def load_reference_maybe_broken(cls, *args, **kwargs):
    reference = LOAD_REFERENCE(cls, *args, **kwargs)
    if BROKEN_REFERENCE["on"]:
        norm = reference.model.model.norm.weight
        # Partitioned by ZeRO-3 at load: gathered, changed on every process alike, partitioned again
        gathered = whole_parameters([norm], modifier_rank=0) if hasattr(norm, "ds_id") else nullcontext()
        with gathered, torch.no_grad():
            norm.add_(0.5)
    return reference


def saving_a_late_part(self, output_dir):
    """As each process writes its shard of a sharded checkpoint: process 1 writes a file of its own, 1 s late."""
    SAVE_OPTIMIZER(self, output_dir)
    if self.accelerator.process_index == 1:
        time.sleep(1)
        Path(output_dir, "late-part-rank1.bin").write_bytes(b"part")


def measuring_prepare_reference(self, deepspeed, fsdp):
    PREPARE_REFERENCE(self, deepspeed, fsdp)
    for module in self.modules:
        shards = sum(p.ds_tensor.numel() * p.element_size() for p in module.parameters() if hasattr(p, "ds_id"))
        SEEN["reference_bytes"] = (*parameter_bytes(module), shards)


ReferencePrecompute.batch_reference = counting_precompute_batches
Reference.load = classmethod(load_reference_maybe_broken)
Reference.prepare = measuring_prepare_reference
Trainer._save_optimizer_and_scheduler = saving_a_late_part
modeling_utils.checkpoint = counting_checkpoint  # what `activation_checkpointing_enable` binds each layer to


def whole_parameters(params, modifier_rank=None):
    """ZeRO-3's gather of partitioned parameters (a collective: every process enters it)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def with_fsdp_on_the_cpu(version: int) -> None:
    """`MinorSFTTrainer` whose accelerator runs FSDP over the processes' CPU device mesh: accelerate enables FSDP on
    accelerators only, and on a CPU machine runs an FSDP config as plain data parallelism. Everything after the switch
    (`prepare` sharding the policy with `fully_shard`, TRL's `prepare_fsdp` the reference, the sharded checkpoints) is
    accelerate's, TRL's and this package's own code."""
    create_accelerator = MinorSFTTrainer.create_accelerator_and_postprocess

    def create_accelerator_with_fsdp(trainer):
        create_accelerator(trainer)
        state = trainer.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=version,
            auto_wrap_policy="transformer_based_wrap",
            state_dict_type="SHARDED_STATE_DICT",
            reshard_after_forward=True,
            cpu_ram_efficient_loading=False,
        )
        # As accelerate switches a multi-GPU state to FSDP: in the process state too, which every new state copies
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        trainer.is_fsdp_enabled = True

    MinorSFTTrainer.create_accelerator_and_postprocess = create_accelerator_with_fsdp


def partition_every_parameter(plugin) -> None:
    """Under ZeRO-3, no parameter stays whole between its uses: each is gathered for its module's forward (and
    backward, and the recomputation of activation checkpointing) and released after it, as a real model's weight
    matrices are. DeepSpeed keeps a parameter whole once used if it has at most `stage3_param_persistence_threshold`
    values (1e5 by default), which is every parameter of the tiny models. Set before the model loads: the threshold is
    read both as it is partitioned at load (`zero3_init_flag`, through the config `set_deepspeed_weakref` publishes)
    and by the training engine."""
    plugin.deepspeed_config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
    plugin.set_deepspeed_weakref()


def build(model_dir: str, out_dir: Path, cell: dict, **overrides) -> MinorSFTTrainer:
    settings = dict(
        max_steps=2,
        per_device_train_batch_size=cell["per_device_train_batch_size"],
        gradient_accumulation_steps=cell.get("gradient_accumulation_steps", 1),
        optim="sgd",
        learning_rate=100.0 if cell["loss_type"] == "asft" else 0.5,  # DFT scales the step by the tiny probabilities
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        loss_type=cell["loss_type"],
        beta=0.5,
    )
    if cell["loss_type"] in ("asft", "sft_kl"):
        settings["kl_coef"] = 100.0
        if cell["precompute"]:  # every token of the tiny models' nearly uniform distributions: the anchor at work
            settings["ref_top_k"] = len(AutoTokenizer.from_pretrained(cell.get("model_dir", model_dir)))
    if cell.get("activation_checkpointing"):
        settings["activation_checkpointing"] = True
    if cell["reference"] == "explicit":
        settings["ref_model_name_or_path"] = model_dir
    if cell["precompute"]:
        settings.update(precompute_ref_log_probs=True, ref_cache_dir=str(out_dir / cell["name"] / "cache"))
    if cell.get("drift_prompts"):
        settings.update(
            eval_strategy="steps",
            eval_steps=1,
            drift_prompts=cell["drift_prompts"],
            drift_text_dataset=cell["drift_texts"],
            drift_num_prompts=40,
            ref_cache_dir=str(out_dir / cell["name"] / "cache"),
        )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=cell.get("lora_bias", "none"))
    model_dir = cell.get("model_dir", model_dir)
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    args = cpu_args(out_dir / cell["name"], **{**settings, **overrides})
    if cell.get("partitioned") and args.deepspeed_plugin is not None and args.deepspeed_plugin.zero_stage == 3:
        partition_every_parameter(args.deepspeed_plugin)
    return MinorSFTTrainer(
        model_dir,
        quantization_config=four_bit if cell.get("four_bit") else None,
        args=args,
        train_dataset=prompt_completion_dataset(),
        eval_dataset=prompt_completion_dataset() if cell.get("drift_prompts") else None,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=None if cell["reference"] == "copy" else lora,
    )


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights, whole (gathered from their ZeRO-3 partitions or FSDP2 shards: every process calls)."""
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    gathered = whole_parameters(list(trainable.values())) if is_deepspeed_zero3_enabled() else nullcontext()
    with gathered:
        return {
            name: param.full_tensor() if isinstance(param, DTensor) else param.detach().clone()
            for name, param in sorted(trainable.items())
        }


def run(model_dir: str, out_dir: Path, cell: dict) -> MinorSFTTrainer | None:
    """Train the cell and write its report; `None` if the trainer refused the cell (the reason is reported)."""
    SEEN.update(forwards=0, reference_bytes=None, checkpointed=0)
    BROKEN_REFERENCE["on"] = cell.get("broken_reference", False)
    # Resumed: trained to step 1 with a checkpoint there, and a second trainer resumes from it to step 2
    first = dict(max_steps=1, save_strategy="steps", save_steps=1) if cell.get("resume") else {}
    try:
        trainer = build(model_dir, out_dir, cell, **first)
    except ValueError as error:
        if PartialState().is_main_process:
            (out_dir / f"{cell['name']}.json").write_text(json.dumps({"refused": str(error)}))
        return None
    gather = trainer.accelerator.gather
    report = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type).removeprefix("DistributedType."),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "precompute_forwards": gather(torch.tensor([SEEN["forwards"]])).tolist(),
        "reference_bytes": None
        if SEEN["reference_bytes"] is None
        else gather(torch.tensor([SEEN["reference_bytes"]])).tolist(),
    }
    weights = {"before": trainable_weights(trainer.model)}
    try:
        trainer.train()
        if cell.get("resume"):
            trainer._release_engines()
            trainer = build(model_dir, out_dir, cell)
            trainer.train(resume_from_checkpoint=str(out_dir / cell["name"] / "checkpoint-1"))
    except RuntimeError as error:
        report["error"] = str(error)
    history = trainer.state.log_history
    report.update(
        engine=type(trainer.model_wrapped).__name__,
        checkpointed_forwards=SEEN["checkpointed"],
        # Under ZeRO-3: how many of the policy's parameters DeepSpeed keeps whole between their uses
        persistent_parameters=sum(getattr(p, "ds_persist", False) for p in trainer.model.parameters())
        if is_deepspeed_zero3_enabled()
        else None,
        losses=[log["loss"] for log in history if "loss" in log],
        deviation=[log["deviation"] for log in history if "deviation" in log],
        kl=[log["kl"] for log in history if "kl" in log],
        # The drift measures at each evaluation (the sampled forward KL where the run keeps no reference)
        drift=[
            [log["step"], log.get("eval_forward_kl", log.get("eval_forward_kl_sampled"))]
            + [log.get(key) for key in ("eval_nll_change", "eval_deviation")]
            for log in drift_log_history(trainer.state)
            if "eval_forward_kl" in log or "eval_forward_kl_sampled" in log
        ],
    )
    weights["after"] = trainable_weights(trainer.model)
    if trainer.accelerator.is_main_process:
        torch.save(weights, out_dir / f"{cell['name']}.pt")
        (out_dir / f"{cell['name']}.json").write_text(json.dumps(report))
    return trainer


def main(model_dir: str, out_dir: str, cells: str, fsdp_version: str | None = None) -> None:
    if fsdp_version is not None:
        with_fsdp_on_the_cpu(int(fsdp_version))
    last = None
    for cell in json.loads(Path(cells).read_text()):
        trainer = run(model_dir, Path(out_dir), cell)
        if trainer is not None:
            if last is not None:
                # As `end` does, but the group stays for the next cell: a finished cell's engines must not outlive it
                last._release_engines()
            last = trainer
    rank = last.accelerator.process_index
    last.end()
    del trainer, last
    (Path(out_dir) / f"after-end-{rank}.json").write_text(json.dumps(what_outlives_end()))


def what_outlives_end() -> dict[str, int]:
    """What of the trainers' engines is still alive once `end` destroyed the process group (freed at interpreter
    exit, where gloo's threads can abort the process): DDP wrappers, DeepSpeed engines (they hold process groups),
    and models on DeepSpeed's global module stack (ZeRO-3 puts each engine's model there)."""
    gc.collect()
    alive = gc.get_objects()
    report = {"ddp_wrappers": sum(isinstance(o, DistributedDataParallel) for o in alive)}
    if is_deepspeed_available():
        from deepspeed import DeepSpeedEngine
        from deepspeed.runtime.zero import parameter_offload

        engines = sum(isinstance(o, DeepSpeedEngine) for o in alive)
        report.update(deepspeed_engines=engines, module_stack=len(parameter_offload.FWD_MODULE_STACK))
    return report


if __name__ == "__main__":
    main(*sys.argv[1:])
