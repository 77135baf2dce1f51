"""A NaN or infinite training loss: where it comes from, and whether training goes on."""

import torch
import transformers

logger = transformers.utils.logging.get_logger(__name__)


class NonFiniteLoss:
    """What a `MinorSFTTrainer` does with a NaN or infinite training loss. A loss that reads the reference stops with
    the step and the likely cause, rather than train on and save a broken model: its log-ratios and weights mean
    nothing from there. TRL's own losses (`nll`, `dft`) train on as `SFTTrainer` does (transformers'
    `logging_nan_inf_filter` even hides the NaN from the logged loss), with one warning that names the cause."""

    def __init__(self):
        self._warned = False

    def handle(self, loss: torch.Tensor, step: int, args, policy: torch.nn.Module, reference) -> None:
        """`policy`: the unwrapped policy; `reference`: the run's `Reference`. Their weights are searched for the
        cause."""
        models = [("policy", policy), *(("reference", module) for module in reference.modules)]
        message = f"The training loss is {loss.item()} at step {step}: {_cause(step, models)}"
        if args.reference_loss is not None:
            raise RuntimeError(
                f"{message} Training stops here, before a broken model is saved: loss_type={args.loss_type!r} "
                "reads the reference, and its log-ratios, weights and KL mean nothing from here on (TRL's `nll` and "
                "`dft` train on, as SFTTrainer does)."
            )
        if not self._warned:
            self._warned = True
            logger.warning(
                f"{message} With loss_type={args.loss_type!r} training goes on, as SFTTrainer's does, but the "
                "updates from here are likely NaN: check the model before you use it. Said once."
            )


def _cause(step: int, models: list[tuple[str, torch.nn.Module]]) -> str:
    """Why the training loss is not finite, and the fix: broken weights (at load, or diverged), or the forward."""
    broken = [
        f"{label} {name!r}"
        for label, module in models
        for name, param in module.named_parameters()
        if param.is_floating_point() and not torch.isfinite(param).all()
    ]
    if broken:
        return f"{len(broken)} weights hold NaN or inf (e.g. the {broken[0]}): " + (
            "the model was broken when loaded; check the checkpoint (and its dtype: a float16 conversion can "
            "overflow)."
            if step == 0
            else "the updates diverged; lower `learning_rate`, or keep `max_grad_norm` on."
        )
    return (
        "the weights are finite, but the forward is not: a float16 overflow (train in bf16 or float32), or "
        "logits the loss cannot take."
    )
