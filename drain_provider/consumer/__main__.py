"""`python -m drain_provider.consumer open|status|chat|close` (see cli.py)."""

from drain_provider.consumer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
