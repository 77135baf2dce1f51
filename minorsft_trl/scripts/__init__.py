"""Training scripts run by the `minorsft-trl` console command (and by `accelerate launch`)."""
