"""The precision the forwards really run under, which the reference's tolerances and caches key on: accelerate's
autocast (which `accelerate launch` may turn on while the training arguments say otherwise) and half-precision
weights."""

import torch
import transformers

logger = transformers.utils.logging.get_logger(__name__)


def autocast_precision(accelerator) -> str:
    """The precision the forward really runs under: accelerate's autocast (which `accelerate launch` may turn on
    while `args.bf16` is False), not what the training arguments say."""
    return accelerator.mixed_precision if accelerator.native_amp else "no"


def half_precision(accelerator, policy: torch.nn.Module, reference) -> bool:
    """Whether either side of the log-ratio computes in half precision: under autocast, or with half-precision
    weights (a bf16 model; or QLoRA's trained parameters, which TRL casts to bf16, e.g. a `modules_to_save` copy
    of the LM head that the policy runs in bf16 where its reference runs the model's float32 head).

    Args:
        policy: the policy, wrapped or not.
        reference: the run's `Reference` (its separate model's weights count too).
    """
    if autocast_precision(accelerator) != "no":
        return True
    return any(
        param.dtype in (torch.bfloat16, torch.float16)
        for model in (accelerator.unwrap_model(policy), *reference.modules)
        for param in model.parameters()
    )


def warn_if_launcher_overrides_precision(args, accelerator, dtype: torch.dtype) -> None:
    """`accelerate launch` with `mixed_precision: bf16` trains under autocast even when the arguments say
    `bf16: false`: say so, since the precision that runs is not the one the recipe shows. And a mixed precision
    the device has no autocast for (fp16 on a CPU) is ignored by accelerate: say that too."""
    launched = accelerator.mixed_precision
    requested = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    if launched != "no" and autocast_precision(accelerator) == "no":
        logger.warning(
            f"mixed_precision={launched!r} (from the accelerate config, `--mixed_precision` or the training "
            f"arguments) is ignored on this device ({accelerator.device.type}: accelerate has no {launched} "
            f"autocast for it): training runs in {str(dtype).removeprefix('torch.')}. Use "
            "`--mixed_precision bf16`, or `no` to say what runs."
        )
    elif launched != requested:
        logger.warning(
            f"The accelerate config (or `--mixed_precision`) sets mixed_precision={launched!r}, which overrides "
            f"the training arguments (bf16={args.bf16}, fp16={args.fp16}): training and the reference "
            f"run under {launched} autocast. Set `mixed_precision: {requested}` in the accelerate config (or pass "
            f"`--mixed_precision {requested}` to `accelerate launch`) to train as the recipe says."
        )
