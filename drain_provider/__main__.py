"""`python -m drain_provider [serve|dev]`."""

import time

STARTED = time.monotonic()  # before the heavy imports: `dev` reports its start-up time from here

from drain_provider.cli import main  # noqa: E402
from drain_provider.process import exit_watched  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(exit_watched(main(started=STARTED)))
