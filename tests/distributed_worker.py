"""Run under `accelerate launch` by tests/test_distributed.py: builds (and mostly trains) the tiny model, writes what
this process saw (world size, distributed type, logged losses, final trainable weights, precomputed reference
log-probs) to `<out>/rank<i>.json`.

    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 tests/distributed_worker.py \
        <model_dir> <out_dir> [mode]

Modes:
- `on the fly` (default): two training steps with the adapter-disabled reference.
- `precompute`: the same with precomputed reference log-probs, each process computing its share.
- `fsdp reference`: no training; a separate reference sharded with torch's FSDP2 `fully_shard` over a CPU device mesh
  (what `prepare_fsdp` does on GPUs, which accelerate cannot run on a CPU machine), then precomputed.
- `sharded save`: two steps with a checkpoint after each, where process 1 writes a file of its own into the
  checkpoint late (as each process writes its shard under FSDP or ZeRO).
The trainable weights are also saved to `<out>/rank<i>.pt`.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig
from tiny import cpu_args, prompt_completion_dataset
from transformers import AutoTokenizer, Trainer

import minorsft_trl.trainer as trainer_module
from minorsft_trl import MinorSFTTrainer


def shard_on_a_cpu_mesh(model, accelerator):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    SEEN["reference_sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    return model


def with_fsdp_enabled(trainer):
    CREATE_ACCELERATOR(trainer)
    trainer.is_fsdp_enabled = True


def late_shard_on_process_1(trainer, output_dir):
    SAVE_OPTIMIZER(trainer, output_dir)
    if trainer.accelerator.process_index == 1:
        time.sleep(2)
        Path(output_dir, "shard-rank1.bin").write_bytes(b"shard")


SEEN = {}
CREATE_ACCELERATOR = MinorSFTTrainer.create_accelerator_and_postprocess
SAVE_OPTIMIZER = Trainer._save_optimizer_and_scheduler


def main(model_dir: str, out_dir: str, mode: str = "on the fly") -> None:
    overrides = {}
    if mode in ("precompute", "fsdp reference"):
        # "precompute" through the default, "auto", which chooses it under several processes too
        choice = "auto" if mode == "precompute" else True
        overrides = dict(precompute_ref_log_probs=choice, ref_cache_dir=str(Path(out_dir) / "cache"))
    if mode == "fsdp reference":
        trainer_module.prepare_fsdp = shard_on_a_cpu_mesh
        MinorSFTTrainer.create_accelerator_and_postprocess = with_fsdp_enabled
        overrides["ref_model_name_or_path"] = model_dir
    if mode == "sharded save":
        Trainer._save_optimizer_and_scheduler = late_shard_on_process_1
        overrides.update(save_strategy="steps", save_steps=1)
    forwards = []  # reference forwards run by this process while the trainer is built (the precompute)
    reference_logps = MinorSFTTrainer._reference_logps
    MinorSFTTrainer._reference_logps = lambda self, *args: forwards.append(1) or reference_logps(self, *args)
    trainer = MinorSFTTrainer(
        model_dir,
        args=cpu_args(out_dir, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, beta=0.5, **overrides),
        train_dataset=prompt_completion_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    report = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp": trainer.is_fsdp_enabled,
        "reference_forwards": len(forwards),
        "ref_logps": list(trainer.train_dataset["ref_logps"])
        if "ref_logps" in trainer.train_dataset.column_names
        else None,
        **SEEN,
    }
    if mode != "fsdp reference":
        trainer.train()
        trainable = {
            name: p.detach().clone() for name, p in sorted(trainer.model.named_parameters()) if p.requires_grad
        }
        weights = hashlib.sha256()
        for name, param in trainable.items():
            weights.update(name.encode() + param.numpy().tobytes())
        torch.save(trainable, Path(out_dir, f"rank{trainer.accelerator.process_index}.pt"))
        report.update(
            losses=[log["loss"] for log in trainer.state.log_history if "loss" in log],
            deviation=[log["deviation"] for log in trainer.state.log_history if "deviation" in log],
            weights_sha256=weights.hexdigest(),
        )
    Path(out_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report))
    trainer.end()


if __name__ == "__main__":
    main(*sys.argv[1:])
