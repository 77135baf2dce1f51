"""minorsft_trl: Minor SFT (arXiv 2408.10642) as a drop-in for TRL's `SFTTrainer`."""

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes (PEFT does, for any run) warns that an optional faster kernel could
# not be fetched from the Hugging Face Hub. It concerns no run of this library (4-bit training takes another path,
# see `reference.quantized_layers_in_train_mode`), so it is kept out of the user's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import MinorSFTConfig  # noqa: E402  (after the logging setting above)
from .losses import (  # noqa: E402
    asft_loss,
    deviation,
    iw_sft_loss,
    iw_sft_weight,
    minor_sft_loss,
    minor_sft_weight,
    sft_dpo_loss,
    sft_kl_loss,
)
from .trainer import MinorSFTTrainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MinorSFTConfig",
    "MinorSFTTrainer",
    "asft_loss",
    "deviation",
    "iw_sft_loss",
    "iw_sft_weight",
    "minor_sft_loss",
    "minor_sft_weight",
    "sft_dpo_loss",
    "sft_kl_loss",
]
