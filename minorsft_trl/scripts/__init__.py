"""The documented path of the training script, `python -m minorsft_trl.scripts.minor_sft`; its code is
`minorsft_trl.cli.train`."""
