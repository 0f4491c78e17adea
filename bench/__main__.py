"""`python -m bench [--quick]`: set everything up on loopback, measure, print the tables, and write
every figure to bench/results/latest.json (or --output)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from . import ledger_scale, memory, overhead, stream
from .harness import build_rig

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
CHANNELS = 256  # one per concurrent client at the highest concurrency


def cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(results: dict[str, Any]) -> str:
    out = ["Non-streaming, 0 ms upstream, load from 2 separate processes:", ""]
    out.append("| concurrency | path | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | server CPU us/req |")
    out.append("|---|---|---|---|---|---|---|---|")
    for level, figures in results["overhead"].items():
        for path in ("upstream", "passthrough", "drain-provider"):
            f = figures[path]
            out.append(
                f"| {level} | {'direct' if path == 'upstream' else path} | {cell(f['p50_ms'])} | {cell(f['p99_ms'])} "
                f"| {cell(f.get('added_p50_ms'))} | {cell(f.get('added_p99_ms'))} | {cell(f['requests_per_s'], 0)} "
                f"| {cell(f['server_cpu_us_per_request'], 0)} |"
            )
    s = results["stream"]
    out += ["", "Streaming:", "", "| figure | direct | pass-through | drain-provider |", "|---|---|---|---|"]
    ttft = s["ttft_ms_p50"]
    out.append(
        f"| time to first token p50 (ms) | {cell(ttft['direct'])} | {cell(ttft['passthrough'])} "
        f"| {cell(ttft['drain-provider'])} |"
    )
    out.append(
        f"| TTFT added over direct, p50 (ms) | - | {cell(s['ttft_added_ms_p50']['passthrough'])} "
        f"| {cell(s['ttft_added_ms_p50']['drain-provider'])} |"
    )
    cpu = s["relay_cpu_us_per_token_event"]
    out.append(
        f"| relay CPU per token event (us) | - | {cell(cpu['passthrough'], 1)} | {cell(cpu['drain-provider'], 1)} |"
    )
    m = results["memory"]
    out.append(
        f"| RSS with {m['streams']} open streams (MB) | - | {cell(m['passthrough']['rss_peak_mb'], 0)} "
        f"| {cell(m['drain-provider']['rss_peak_mb'], 0)} |"
    )
    out += ["", "Ledger size:", "", "| rows in the ledger | server CPU us per paid request | req/s |", "|---|---|---|"]
    for rows, f in results["ledger"].items():
        if rows.isdigit():
            out.append(
                f"| {int(rows):,} | {cell(f['server_cpu_us_per_request'], 0)} | {cell(f['requests_per_s'], 0)} |"
            )
    out += ["", targets(results)]
    return "\n".join(out)


def targets(results: dict[str, Any]) -> str:
    o32, o256 = results["overhead"]["32"], results["overhead"]["256"]
    streams = results["memory"]["streams"]
    rss = results["memory"]["drain-provider"]["rss_peak_mb"]
    relay = results["stream"]["relay_cpu_us_per_token_event"]["drain-provider"]
    rps = o256["drain-provider"]["requests_per_s"]
    rows = [
        ("server CPU per paid request vs pass-through (c=32)", "<= 1.5x",
         f"{o32['cpu_ratio_provider_vs_passthrough']:.2f}x"),
        ("added latency over direct, c=32, p50", "<= 1 ms", f"{o32['drain-provider']['added_p50_ms']:.2f} ms"),
        ("added latency over direct, c=32, p99", "<= 5 ms", f"{o32['drain-provider']['added_p99_ms']:.2f} ms"),
        ("paid requests/s, c=256", ">= 1000",
         f"{rps:.0f} ({o256['rps_ratio_provider_vs_passthrough']:.2f}x the pass-through)"),
        (f"RSS with {streams} open streams", "<= 250 MB", f"{rss:.0f} MB"),
        ("relay CPU per token event", "<= 20 us", f"{relay:.0f} us"),
        ("CPU per request, largest ledger vs 10k rows", "<= 1.2x", f"{results['ledger']['largest_vs_smallest']:.2f}x"),
    ]  # fmt: skip
    lines = ["| target | goal | measured |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


async def main(quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    rig = await build_rig(channels=CHANNELS)
    try:
        results: dict[str, Any] = {
            "quick": quick,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "setup_seconds": round(time.monotonic() - started, 1),
            "overhead": await overhead.run(rig, quick=quick),
            "stream": await stream.run(rig, quick=quick),
            "memory": await memory.run(rig, quick=quick),
            "ledger": await ledger_scale.run(rig, quick=quick),
        }
        results["seconds"] = round(time.monotonic() - started, 1)
        return results
    finally:
        rig.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"where the JSON goes (default {RESULTS})")
    args = parser.parse_args()
    results = asyncio.run(main(args.quick))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))
    print(f"\n(run took {results['seconds']} s; figures in {args.output})")
