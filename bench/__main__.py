"""`python -m bench [--quick]`: set everything up on loopback, measure, print a table, and write
every figure to bench/results/latest.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path
from typing import Any

from . import stream
from .harness import build_rig

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def table(results: dict[str, Any]) -> str:
    s = results["stream"]
    rows = [
        ("time to first token p50 (ms)", s["ttft_ms_p50"]["direct"], s["ttft_ms_p50"]["passthrough"],
         s["ttft_ms_p50"]["drain-provider"]),
        ("time to first token p99 (ms)", s["ttft_ms_p99"]["direct"], s["ttft_ms_p99"]["passthrough"],
         s["ttft_ms_p99"]["drain-provider"]),
        ("TTFT added over direct, p50 (ms)", None, s["ttft_added_ms_p50"]["passthrough"],
         s["ttft_added_ms_p50"]["drain-provider"]),
        ("relay CPU per token event (µs)", None, s["relay_cpu_us_per_token_event"]["passthrough"],
         s["relay_cpu_us_per_token_event"]["drain-provider"]),
    ]  # fmt: skip

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["| figure | direct | pass-through | drain-provider |", "|---|---|---|---|"]
    lines += [f"| {name} | {cell(a)} | {cell(b)} | {cell(c)} |" for name, a, b, c in rows]
    ratio = s["relay_cpu_ratio_vs_passthrough"]
    lines.append(f"\nrelay CPU per token event, drain-provider / pass-through: {cell(ratio)}x")
    return "\n".join(lines)


async def main(quick: bool) -> dict[str, Any]:
    rig = await build_rig(channels=32)
    try:
        started = time.monotonic()
        results: dict[str, Any] = {
            "quick": quick,
            "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
            "stream": await stream.run(rig, quick=quick),
        }
        results["seconds"] = round(time.monotonic() - started, 1)
        return results
    finally:
        rig.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run in well under a minute")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"where the JSON goes (default {RESULTS})")
    args = parser.parse_args()
    results = asyncio.run(main(args.quick))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n(run took {results['seconds']} s; figures in {args.output})")
