"""minorsft_trl: Minor SFT (arXiv 2408.10642) as a drop-in for TRL's `SFTTrainer`."""

from .config import MinorSFTConfig
from .losses import deviation, minor_sft_loss, minor_sft_weight, sft_dpo_loss
from .trainer import MinorSFTTrainer

__version__ = "0.1.0"

__all__ = [
    "MinorSFTConfig",
    "MinorSFTTrainer",
    "deviation",
    "minor_sft_loss",
    "minor_sft_weight",
    "sft_dpo_loss",
]
