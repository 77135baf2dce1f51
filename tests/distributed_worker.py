"""Run under `accelerate launch` by tests/test_distributed.py: trains the tiny model for two steps and writes what
this process saw (world size, distributed type, logged losses, final trainable weights) to `<out>/rank<i>.json`.

    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 tests/distributed_worker.py \
        <model_dir> <out_dir> [precompute]

With `precompute`, the reference log-probs are precomputed (by the main process, read from the cache by the other).
The trainable weights are also saved to `<out>/rank<i>.pt`.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from tiny import cpu_args, prompt_completion_dataset
from transformers import AutoTokenizer

from minorsft_trl import MinorSFTTrainer


def main(model_dir: str, out_dir: str, mode: str = "on the fly") -> None:
    precompute = dict(precompute_ref_log_probs=True, ref_cache_dir=str(Path(out_dir) / "cache"))
    trainer = MinorSFTTrainer(
        model_dir,
        args=cpu_args(
            out_dir,
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            beta=0.5,
            **(precompute if mode == "precompute" else {}),
        ),
        train_dataset=prompt_completion_dataset(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainable = {name: p.detach().clone() for name, p in sorted(trainer.model.named_parameters()) if p.requires_grad}
    weights = hashlib.sha256()
    for name, param in trainable.items():
        weights.update(name.encode() + param.numpy().tobytes())
    torch.save(trainable, Path(out_dir, f"rank{trainer.accelerator.process_index}.pt"))
    report = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp": trainer.is_fsdp_enabled,
        "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "deviation": [log["deviation"] for log in trainer.state.log_history if "deviation" in log],
        "weights_sha256": weights.hexdigest(),
    }
    Path(out_dir, f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
