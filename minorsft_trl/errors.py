"""What the command-line doors (`minorsft-trl train`, `python -m minorsft_trl.scripts.minor_sft`, `minorsft-trl
compare`) do with an error: a mistake in the user's input (`InputError`: a recipe value, a data file, a path, an
option) ends as one sentence on stderr and exit code 2, in every process of a launch; any other error, a bug, keeps
its traceback. `MINORSFT_TRL_TRACEBACK=1` shows the traceback of input errors too.

In Python, an `InputError` is a `ValueError`, raised before training starts, as every check of this library raises.
"""

import os
import sys
from collections.abc import Callable

# Set to 1 to see the traceback of an input error too
TRACEBACK_ENV = "MINORSFT_TRL_TRACEBACK"


class InputError(ValueError):
    """A mistake in what the user gave, said with the value and the fix."""


def run_command(prog: str, command: Callable[[], object]) -> int:
    """Run `command`: 0 when it returns, 2 and one sentence on stderr for an `InputError` (its traceback with
    `MINORSFT_TRL_TRACEBACK=1`); any other exception propagates with its traceback."""
    try:
        command()
    except InputError as error:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 2
    return 0
