"""Content fingerprints of what a reference computes: its weights, its configuration, and the batches it scores.

Two runs may share precomputed reference log-probs only if everything that changes those numbers is equal: the
weights (by value, not by name or path), the model configuration (`rms_norm_eps`, `hidden_act`, rope scaling,
softcapping, the 4-bit quantization settings, ...), the attention implementation, the configuration of a `"ref"`
adapter (`lora_alpha` scales its output), and the batches exactly as the collator builds them (tokens, loss mask,
packing, padding-free positions, and whatever a custom collator or a vision processor adds).
"""

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset
from torch.distributed.tensor import DTensor
from trl.trainer.utils import get_config_model_id

from .models import belongs_to_adapter

# Configuration entries that say where a model came from, or set forward options the reference pass overrides
# (TRL turns `use_cache` off on the policy), not what it computes
_IGNORED_KEYS = (
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "base_model_name_or_path",
    "revision",
    "use_cache",
)


def canonical(value: Any) -> Any:
    """A JSON-serialisable, order-stable form of a configuration value (sets sorted, dtypes and enums as strings,
    provenance and forward options left out)."""
    if isinstance(value, dict):
        return {
            str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])) if k not in _IGNORED_KEYS
        }
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def module_fingerprint(
    module: torch.nn.Module,
    canonical_name: Callable[[str], str | None] = lambda name: name,
    sample: int | None = None,
) -> str:
    """A sha256 of a module's weights and buffers (names, dtypes, shapes, values).

    Args:
        module: the module.
        canonical_name: renames each state-dict entry, or returns `None` to leave it out.
        sample: hash only this many evenly spaced values of each tensor (a cheap identity that still tells two models
            apart); `None` hashes every value.
    """
    digest = hashlib.sha256()
    entries = {canonical_name(name): tensor for name, tensor in module.state_dict(keep_vars=True).items()}
    for name, tensor in sorted((n, t) for n, t in entries.items() if n is not None and isinstance(t, torch.Tensor)):
        # Sharded weights are gathered (every process hashes, in the same order): FSDP2 DTensors, and ZeRO-3
        # parameters, which hold an empty shard outside `GatheredParameters`
        with _zero3_gathered(tensor):
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            values = tensor.detach().reshape(-1)
            if sample is not None and values.numel() > sample:
                values = values[:: values.numel() // sample][:sample]
            digest.update(values.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _zero3_gathered(tensor: torch.Tensor):
    """DeepSpeed's `GatheredParameters` for a ZeRO-3 partitioned parameter, else a no-op."""
    if not hasattr(tensor, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)


# The modules PEFT puts between a wrapped module and its weights: LoRA-type layers (`base_layer`), `modules_to_save`
# (`original_module`), `trainable_token_indices` (`token_adapter.base_layer`)
_PEFT_WRAPPERS = frozenset({"base_layer", "original_module", "token_adapter"})


def peft_reference_name(name: str, other_adapters: list[str]) -> str | None:
    """The name of a PEFT model's state-dict entry in the plain model, or `None` for the weights of an adapter the
    reference does not run: the adapter-disabled reference then fingerprints exactly like its base model, whatever
    modules the adapter wraps or copies."""
    if any(belongs_to_adapter(name, adapter) for adapter in other_adapters):
        return None
    parts = name.removeprefix("base_model.model.").split(".")
    return ".".join(part for part in parts if part not in _PEFT_WRAPPERS)


def model_identity(model: torch.nn.Module, canonical_name: Callable[[str], str | None], adapter_config=None) -> dict:
    """Everything of a reference model that changes its log-probs: weights (full content hash), configuration,
    attention implementation, and the configuration of the adapter it runs (if any)."""
    config = model.config
    return {
        "weights": module_fingerprint(model, canonical_name),
        "config": canonical(config.to_dict()),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "adapter": canonical(adapter_config.to_dict()) if adapter_config is not None else None,
    }


def batches_fingerprint(batches: Iterable[dict[str, Any]]) -> str:
    """A sha256 of collated batches: every tensor (name, dtype, shape, values) and every other entry (its repr)."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                tensor = value.detach().cpu().contiguous()
                digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(f"{key}:{json.dumps(canonical(value))}".encode())
    return digest.hexdigest()


# The columns of a prepared dataset that say what is trained on
_TRAINED_COLUMNS = ("input_ids", "labels", "completion_mask", "assistant_masks", "seq_lengths")


def dataset_fingerprint(dataset) -> str | None:
    """A sha256 of a prepared (tokenised) map-style dataset's token ids and loss masks, in order; `None` for a
    streamed one. Independent of how the dataset was built (`datasets`' own fingerprint hashes the transforms)."""
    if not isinstance(dataset, Dataset):
        return None
    digest = hashlib.sha256()
    table = dataset.with_format("arrow")[:]
    for name in _TRAINED_COLUMNS:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        digest.update(name.encode())
        digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).tobytes())
        digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def trained_adapter_settings(model: torch.nn.Module) -> dict | None:
    """The configuration of the adapter a PEFT model trains (rank, targets, ...), `None` for full fine-tuning: what a
    checkpoint's weights must fit."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return canonical(config.to_dict()) if config is not None else None


def run_identity(args, policy: torch.nn.Module, reference_weights: tuple) -> dict:
    """What a checkpoint of a run belongs to (`checkpoints.check_run_identity`): its loss and settings, the policy's
    base model and trained adapter, and a sampled fingerprint of the reference's weights (`Reference.weights()`)."""
    reference, canonical_name, _ = reference_weights
    identity = {
        "loss_type": args.loss_type,
        "model": get_config_model_id(policy.config),
        "reference": module_fingerprint(reference, canonical_name, sample=1024),
        "settings": {name: getattr(args, name) for name in args.loss_settings},
        "adapter": trained_adapter_settings(policy),
    }
    if args.needs_reference_distribution and args.precompute_ref_log_probs:  # the anchor from the top-k and draws
        identity["settings"]["ref_top_k"] = args.ref_top_k
        identity["settings"]["ref_tail_samples"] = args.ref_tail_samples
    if args.target_forward_kl is not None:  # the coefficient's path: steered to this budget
        identity["settings"]["target_forward_kl"] = args.target_forward_kl
    return identity
