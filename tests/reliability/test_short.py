"""The short runs of the reliability scenarios, collected by the normal suite: the same code as
the long runs of RELIABILITY.md, with small parameters. Each test starts its own processes
(anvil, the demo upstream, drain-provider), so xdist spreads them over its workers.

The admin and malformed-HTTP fuzz families, and the Expect finding, failed on the code before
issue 11's fixes (an admin token or an Expect header that is not UTF-8 was a 500; malformed HTTP
logged aiohttp's ERROR traceback).
"""

from __future__ import annotations

from typing import Any

import pytest

from . import faults, fuzz, instances, kill9, race, report, slow
from .fuzz import deliver_raw
from .fuzz_inputs import Probe
from .rig import build

pytestmark = pytest.mark.reliability


def why(result: dict[str, Any]) -> str:
    """The verdict and what the run found, for an assertion's message."""
    found = {k: v for k, v in result["figures"].items() if k in ("falsifying", "examples", "log_problems")}
    return report.verdict(result) + (f"\n{found}" if found else "")


async def test_kill9_loses_no_voucher_and_leaves_no_reservation() -> None:
    result = await kill9.run(2, clients=4)
    assert result["ok"], why(result)
    assert result["figures"]["accepted"] > 0 and result["figures"]["usage_rows_abandoned"] > 0


async def test_race_accepts_no_voucher_twice() -> None:
    result = await race.run(4, channels=4, copies=8)
    assert result["ok"], why(result)
    assert result["figures"]["accepted"] > 0


async def test_instances_share_one_postgresql_ledger() -> None:
    """Three provider processes on one PostgreSQL ledger: racing vouchers round-robin across them,
    then the claimer's instance killed mid-stream: the others serve, its reservations are
    released, another instance claims, and every invariant holds."""
    result = await instances.run(2, instances=3, channels=3, copies=6)
    assert result["ok"], why(result)
    figures = result["figures"]
    assert figures["answered_200_after_kill_by_survivors"] > 0 and figures["first_leader"] == 0
    assert figures["leader_after_kill"] in (1, 2)


async def test_faults_settle_every_request_once() -> None:
    result = await faults.run(100, clients=8)
    assert result["ok"], why(result)
    injected = result["figures"]["upstream_faults"]
    assert sum(n for kind, n in injected.items() if not kind.endswith(" ok")) > 0


async def test_slow_clients_smoke() -> None:
    """Completes, and every paid request under each attack succeeded; the ratios are not judged."""
    result = await slow.run(0.5, connections=50)
    assert result["ok"], why(result)


async def test_fuzz_paid_endpoints() -> None:
    result = await fuzz.run(100, engine="hypothesis", family="paid")
    assert result["ok"], why(result)


async def test_fuzz_free_endpoints_and_made_up_paths() -> None:
    result = await fuzz.run(60, engine="hypothesis", family="free")
    assert result["ok"], why(result)


async def test_fuzz_admin_api() -> None:
    result = await fuzz.run(50, engine="hypothesis", family="admin", shrink=False)
    assert result["ok"], why(result)


async def test_fuzz_malformed_http() -> None:
    result = await fuzz.run(50, engine="hypothesis", family="http", shrink=False)
    assert result["ok"], why(result)


async def test_fuzz_finding_an_expect_header_not_utf8_is_no_500() -> None:
    """Found by the long fuzz run: aiohttp's default Expect handler puts the header in its 417's
    text and fails to encode it (UnicodeEncodeError: a 500 and a traceback in the log)."""
    rig = await build(0)
    try:
        await rig.start_provider()
        wire = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: \xff\xfe\r\nConnection: close\r\n"
        probe = Probe("http", b"POST", b"/v1/chat/completions", wire_bytes=wire + b"Content-Length: 2\r\n\r\n{}")
        answer = await deliver_raw(rig.port, probe, 5)
        assert answer.status is not None and answer.status < 500, answer
        assert "Traceback" not in rig.log_text()
    finally:
        await rig.close()
