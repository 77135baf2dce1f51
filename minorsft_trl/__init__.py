"""minorsft_trl: Minor SFT (arXiv 2408.10642) as a drop-in for TRL's `SFTTrainer`.

The trainer, its configuration and the losses are imported on first use, so that `minorsft-trl recipes` and the
other light commands do not load torch, transformers and TRL.
"""

import importlib
import logging
import warnings

# On CPUs with AVX512-BF16, importing bitsandbytes (PEFT does, for any run) asks the `kernels` package for an optional
# faster kernel from the Hugging Face Hub, and both warn when it cannot be fetched (offline: "Skipping publisher trust
# check ...", then "Failed to load CPU gemm_4bit_forward ..."). It concerns no run of this library (4-bit training
# takes another path, see `reference.quantized_layers_in_train_mode`), so both are kept out of the user's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not record.getMessage().startswith("Skipping publisher trust check for 'kernels-community/")
)
# PEFT and TRL read transformers' renamed `is_gradient_checkpointing` in every run; nothing for the user to change
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__version__ = "0.1.0"

# Public name -> the module that defines it
_EXPORTS = {
    "MinorSFTConfig": ".config",
    "MinorSFTTrainer": ".trainer",
    "asft_loss": ".losses",
    "deviation": ".losses",
    "iw_sft_loss": ".losses",
    "iw_sft_weight": ".losses",
    "minor_sft_loss": ".losses",
    "minor_sft_weight": ".losses",
    "sft_dpo_loss": ".losses",
    "sft_dpo_weight": ".losses",
    "sft_kl_loss": ".losses",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
