"""The benchmark still runs end to end (a smoke run: its figures are not judged here).

Marked `bench`: it takes over a minute of both cores, so a local `python -m pytest` leaves it
out and CI runs it once on its own (`python -m pytest -m bench`, see .ci/run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.bench
def test_quick_bench_runs_and_writes_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| relay CPU per token event (us) |" in run.stdout and "| target | goal | measured |" in run.stdout
    results = json.loads(output.read_text())
    stream = results["stream"]
    assert set(stream["ttft_ms_p50"]) == {"direct", "passthrough", "drain-provider"}
    assert all(value > 0 for value in stream["ttft_ms_p50"].values())
    assert stream["relay_cpu_us_per_token_event"]["drain-provider"] > 0
    for level in ("1", "32", "256"):
        assert results["overhead"][level]["drain-provider"]["requests"] > 0
    assert results["memory"]["drain-provider"]["completed"] == results["memory"]["streams"]
    assert results["ledger"]["100000"]["server_cpu_us_per_request"] > 0
