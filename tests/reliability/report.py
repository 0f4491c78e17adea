"""What every scenario prints: a JSON summary (parameters, invariants, figures, the date and the
commit it was measured on) and a one-line verdict; the exit code is 1 when an invariant is broken.

An *invariant* is a count that must be 0; a *figure* is anything else measured, for the record.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import subprocess
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from bench.harness import REPO


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty.stdout.strip() else "")


def summary(
    scenario: str, parameters: dict[str, Any], invariants: dict[str, int], figures: dict[str, Any]
) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "parameters": parameters,
        "invariants": invariants,
        "figures": figures,
        "ok": all(value == 0 for value in invariants.values()),
    }


def verdict(result: dict[str, Any]) -> str:
    broken = {name: value for name, value in result["invariants"].items() if value != 0}
    if not broken:
        return f"{result['scenario']}: PASS, all {len(result['invariants'])} invariants 0"
    return f"{result['scenario']}: FAIL, " + ", ".join(f"{name}={value}" for name, value in broken.items())


def main(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]
) -> None:
    """The CLI of a scenario: parse, run, print the summary and the verdict, exit 0 or 1."""
    parser.add_argument("--seed", type=int, default=1, help="the seed of every random choice (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (ledger, provider log)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a provider setting for this run, over the scenario's own (repeatable): --set LEDGER_SYNC=NORMAL",
    )
    args = parser.parse_args()
    args.env = dict(item.split("=", 1) for item in args.set)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    print(verdict(result))
    sys.exit(0 if result["ok"] else 1)
