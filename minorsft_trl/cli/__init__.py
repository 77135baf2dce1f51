"""The command line: `minorsft-trl` (`command`), the recipes and accelerate configs shipped with the package
(`packaged`), and the training script it launches (`train`)."""

from .command import main

__all__ = ["main"]
