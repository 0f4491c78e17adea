"""The measuring instruments behind RELIABILITY.md: one module per scenario, each a CLI
(`python -m tests.reliability.<name> --help`, from the repository's root) that prints a JSON
summary and a one-line verdict and exits 1 when an invariant is broken, and a short run that
the normal test suite collects (`test_short.py`).

Everything runs as real processes on loopback (anvil with our contracts, an OpenAI-format
upstream, drain-provider itself: `rig.py`), and every invariant is counted from the ledger's
SQLite file and from the chain (`audit.py`), never from what the server says about itself.

Modules import each other relatively and nothing from tests/ outside this package, so that the
same files run under pytest (as `reliability.*`) and as `python -m tests.reliability.*`.
"""
