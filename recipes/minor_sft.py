"""The generic Minor SFT training script (TRL's `sft.py` shape), as a file to run, or to copy next to your recipes:

    python recipes/minor_sft.py --config recipes/SmolLM2-135M-Instruct/minor_sft/config_lora.yaml
    accelerate launch --config_file accelerate_configs/ddp.yaml recipes/minor_sft.py --config <recipe.yaml>

Its code is `minorsft_trl.cli.train`, installed with the package and run by `minorsft-trl train` (which also
takes a packaged recipe's name); this file re-exports what `bigbench_demo.py` and the tests import from it.
"""

from minorsft_trl.cli.train import check_types, main, make_parser, parse_args, run

__all__ = ["check_types", "main", "make_parser", "parse_args"]

if __name__ == "__main__":
    raise SystemExit(run())
