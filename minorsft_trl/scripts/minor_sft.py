"""`python -m minorsft_trl.scripts.minor_sft`, the training script's documented path: it runs
`minorsft_trl.cli.train`."""

from minorsft_trl.cli.train import main, parse_args, run

__all__ = ["main", "parse_args", "run"]

if __name__ == "__main__":
    raise SystemExit(run())
