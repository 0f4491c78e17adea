"""`python -m drain_provider doctor`: every check of checks.py, as a table an operator reads before
the first start, or when something is wrong.

Exit code 0 when no check fails (warnings allowed), 1 when one does; a configuration that does
not load is the CLI's one line and exit code 2, as for every command. Read-only: the ledger is
looked at, not created nor bound, and nothing is sent to the chain. Shows no secret: URLs are cut
to their scheme and host, keys are never printed.
"""

from __future__ import annotations

import aiohttp

from . import __version__
from .chain import ChainClient, ChainUnavailable
from .checks import Check, Result, check_chain, check_ledger, check_upstreams, gas_check
from .config import Settings
from .gas import GasGauge
from .upstream import Upstream

RPC_TIMEOUT = 5.0  # per call: a doctor that hangs on a dead RPC helps no one


async def run_doctor(settings: Settings) -> int:
    rows = [
        Check(
            "settings",
            Result.OK,
            f"provider {settings.provider_address}, chain {settings.chain_id}, contract "
            + ", ".join(f"{c.address} ({c.version})" for c in settings.contracts)
            + f", {len(settings.prices)} models priced"
            + ("" if settings.catalog.derived else f" ({len(settings.catalog.upstreams)} upstreams, MODELS_FILE)"),
        ),
        await check_ledger(settings),
    ]
    rows += await _chain_rows(settings)
    async with aiohttp.ClientSession() as session:
        upstreams = {
            name: Upstream(session, spec.base_url, spec.api_key, timeout=RPC_TIMEOUT, name=name)
            for name, spec in settings.catalog.upstreams.items()
        }
        rows += await check_upstreams(settings.catalog, upstreams)
    print(render(rows))
    return 1 if any(row.result is Result.FAIL for row in rows) else 0


async def _chain_rows(settings: Settings) -> list[Check]:
    assert settings.rpc_url is not None
    primary = settings.contracts[0]
    chain = ChainClient.over_http(settings.rpc_url, primary.address, version=primary.version, timeout=RPC_TIMEOUT)
    try:
        rows = await check_chain([chain.for_contract(contract) for contract in settings.contracts], settings)
        if any(row.result is Result.FAIL for row in rows) or rows[0].result is not Result.OK:
            return rows
        gauge = GasGauge(settings.provider_address, settings.low_gas_claims)
        try:
            await gauge.read(chain)
        except ChainUnavailable as exc:
            return [*rows, Check("gas", Result.WARN, f"could not be read ({exc})", "check the RPC")]
        return [*rows, gas_check(gauge)]
    finally:
        await chain.close()


def render(rows: list[Check]) -> str:
    """check | result | detail, with each fix on its own line under its detail."""
    name_width = max(len("check"), *(len(row.name) for row in rows)) + 2
    indent = " " * (name_width + 8)
    lines = [f"drain-provider {__version__} doctor", "", f"{'check':<{name_width}}{'result':<8}detail"]
    for row in rows:
        lines.append(f"{row.name:<{name_width}}{row.result:<8}{row.detail}")
        if row.fix and row.result is not Result.OK:
            lines.append(f"{indent}fix: {row.fix}")
    failed = sum(row.result is Result.FAIL for row in rows)
    warned = sum(row.result is Result.WARN for row in rows)
    summary = [f"{failed} failed"] * bool(failed) + [f"{warned} warnings"] * bool(warned)
    lines += ["", ", ".join(summary) or "all checks passed"]
    return "\n".join(lines)
