"""`python -m minorsft_trl.cli`: the `minorsft-trl` command."""

from .command import main

raise SystemExit(main())
