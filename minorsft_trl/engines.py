"""What the distributed engines (DeepSpeed ZeRO, FSDP) need of the reference passes that run before training, and of
a reference let go."""

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import is_deepspeed_available
from torch.distributed.tensor import DTensor
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.models.utils import prepare_deepspeed


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """The bytes of `model`'s parameters held by this process between forwards, and of the whole model: a parameter
    partitioned by ZeRO-3 holds its shard (and its whole value too if it is small enough to persist); one sharded by
    FSDP2 its local shard; any other parameter its whole value."""
    held = whole = 0
    for param in model.parameters():
        size = param.element_size()
        if hasattr(param, "ds_id"):
            whole += param.ds_numel * size
            held += (param.ds_tensor.numel() + (param.ds_numel if param.ds_persist else 0)) * size
        elif isinstance(param, DTensor):
            whole += param.numel() * size
            held += param.to_local().numel() * size
        else:
            whole += param.numel() * size
            held += param.numel() * size
    return held, whole


@contextmanager
def runnable_before_training(model: torch.nn.Module, accelerator) -> Iterator[None]:
    """Within the block, `model` can run forwards although training has not wrapped it yet.

    Under ZeRO-3 the policy is partitioned as it loads (`zero3_init_flag`), or not at all until an engine partitions
    it (a 4-bit model), and only a DeepSpeed engine gathers the shards for each module's forward (TRL's fused LM head
    expects ZeRO-3 parameters); the training engine exists once `train` starts. A reference pass before that
    (the precompute, the drift measures' samples) runs the policy through a DeepSpeed inference engine, as TRL's
    `DPOTrainer` does, and the engine's hooks are removed after the block, leaving the model to the training engine.
    Every process must run the same forwards in the block. Elsewhere nothing changes."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    training = model.training
    engine = prepare_deepspeed(model, accelerator)
    try:
        yield
    finally:
        destroy_if_engine(engine)
        model.train(training)


def destroy_if_engine(module: torch.nn.Module | None) -> None:
    """Destroy `module` if it is a DeepSpeed engine (the training engine, a separate reference's from TRL's
    `prepare_deepspeed`, the one `runnable_before_training` builds), and let go of what DeepSpeed keeps of it after
    its own `destroy` (0.19): its forward hooks on the model (closures over the engine) and, under ZeRO-3, its
    backward functions on each module (which an engine built later on the model would otherwise run), the model's
    modules on DeepSpeed's global module stack and its parameter coordinator in a cache on the class. Otherwise every
    engine, with its process groups and buffers, lives to interpreter exit, after the process group is destroyed."""
    if not is_deepspeed_available():
        return
    from deepspeed import DeepSpeedEngine
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    if not isinstance(module, DeepSpeedEngine):
        return
    module.destroy()
    forget_backward_functions(module.module)
    for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
        if getattr(module, hook, None) is not None:
            getattr(module, hook).remove()
            setattr(module, hook, None)
    # What follows reads DeepSpeed 0.19's internals (the version the tests pin); another version may keep nothing of
    # the kind, and the run has ended well either way: whatever is not found is left to interpreter exit
    # The model, and those of its modules whose forward never returned: activation checkpointing stops a forward it
    # recomputes in the backward as soon as it holds what the backward needs, before DeepSpeed's hooks pop the module
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    modules = set(module.module.modules())
    stack[:] = [entry for entry in stack if entry not in modules]
    # The ZeRO-3 parameter coordinator's `__params_to_release`, an `lru_cache` on the class, keys on the coordinator
    # and so keeps it, the parameters it traced, their optimizer and engine (and its process groups)
    cached = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    if inspect.isfunction(cached):  # under DeepSpeed's NVTX wrapper
        cached = inspect.getclosurevars(cached).nonlocals.get("func")
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def forget_backward_functions(model: torch.nn.Module) -> None:
    """Remove from each module of `model` the functions through which a ZeRO-3 engine fetches and releases the
    module's parameters in the backward (DeepSpeed 0.19's `pre_bwd_fn` / `post_bwd_fn`), once that engine is
    destroyed.

    DeepSpeed defines them on a module only where the module has none, bound to the engine that defines them, and never
    removes them. An engine built later on the same model (the training engine after `runnable_before_training`'s)
    then runs its forwards with its own parameter coordinator and its backwards with the destroyed engine's. Under
    activation checkpointing with frozen base weights (LoRA, QLoRA), the training engine's coordinator, which never
    saw a backward, meets the forward recomputed inside the backward out of its recorded order, drops its trace and
    releases every parameter of each module after it, the persistent ones too: the recomputed tensors are empty where
    the first forward saved whole weights (`CheckpointError: Recomputed values ... have different metadata`)."""
    for submodule in model.modules():
        for name in ("pre_bwd_fn", "post_bwd_fn"):
            submodule.__dict__.pop(name, None)


def release_engines(accelerator) -> None:
    """Let go of the policy's DeepSpeed engine (its hooks, its optimizer's pending collectives) and of what accelerate
    holds (the DDP wrapper and its reducer): whatever still holds the process group when it is destroyed is freed
    only at interpreter exit (see `MinorSFTTrainer.end`)."""
    if getattr(accelerator, "deepspeed_engine_wrapped", None) is not None:
        destroy_if_engine(accelerator.deepspeed_engine_wrapped.engine)
        accelerator.deepspeed_engine_wrapped = None  # destroyed: not again by `free_memory`
    accelerator.free_memory()
