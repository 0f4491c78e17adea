"""The command line: `serve` (the default) runs the provider, `dev` runs everything locally,
`doctor` checks what the provider depends on, `usage` lists the paid requests, `consumer` pays
one (the consumer kit's CLI)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import NoReturn

from . import __version__
from .config import ConfigError, Settings, load_settings, read_environment, read_setting
from .logs import setup_logging

log = logging.getLogger("drain_provider")


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line and exit 2, as a bad setting is (not argparse's usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"drain-provider: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None, *, started: float | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["consumer"]:  # the consumer kit's own command line, as is
        from .consumer.cli import main as consumer_main

        return consumer_main(argv[1:])
    parser = OneLineParser(prog="python -m drain_provider", description=__doc__)
    parser.add_argument("--version", action="version", version=f"drain-provider {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the provider (the default)")
    dev = commands.add_parser("dev", help="embedded chain + contracts + demo consumer + provider, nothing to configure")
    node = dev.add_mutually_exclusive_group()
    node.add_argument("--rpc-url", help="use this dev node (anvil, hardhat) instead of the embedded chain")
    node.add_argument(
        "--anvil", action="store_true", help="start anvil (from npm install) for outside clients, stopped with dev"
    )
    dev.add_argument("--anvil-port", type=int, default=8545, help="the port of --anvil's JSON-RPC (default: 8545)")
    dev.add_argument("--port", type=int, help="port for the provider (default: PORT or 3000)")
    dev.add_argument("--no-serve", action="store_true", help="exit after the demo call instead of serving")
    claim = commands.add_parser("claim", help="claim what is due now, with or without the server running")
    claim.add_argument("--force", action="store_true", help="claim every channel with unclaimed earnings")
    commands.add_parser("status", help="earnings, claims and gas balance, as JSON")
    commands.add_parser("doctor", help="check the settings, ledger, chain, contract, gas and upstream; print a table")
    commands.add_parser("consumer", help="pay a provider: open, status, chat, close (the consumer kit)")
    usage = commands.add_parser("usage", help="the paid requests in the ledger, newest first (read-only)")
    usage.add_argument("--channel", help="one channel's requests (its 0x id)")
    usage.add_argument("--model", help="one model's requests")
    usage.add_argument("--since", help="started at or after (unix seconds)")
    usage.add_argument("--until", help="started before (unix seconds)")
    usage.add_argument("--before", help="ids below this one (the next page)")
    usage.add_argument("--limit", help="at most this many rows (default 100, at most 1000)")
    usage.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    env = read_environment()
    try:
        if args.command == "dev":
            from .devtools.dev import run_dev

            return asyncio.run(
                run_dev(
                    env,
                    rpc_url=args.rpc_url,
                    port=args.port,
                    serve=not args.no_serve,
                    started=started,
                    anvil_port=args.anvil_port if args.anvil else None,
                )
            )
        if args.command == "usage":
            from .usage_view import FILTERS, run_usage

            wanted = {name: getattr(args, name) for name in FILTERS if getattr(args, name) is not None}
            return run_usage(read_setting("DATABASE_PATH", env), wanted, as_json=args.json)
        if args.command == "doctor":
            from .doctor import run_doctor

            settings = load_settings(env)
            setup_logging("DEBUG" if settings.log_level == "DEBUG" else "ERROR")  # the table says the rest
            return asyncio.run(run_doctor(settings))
        if args.command in ("claim", "status"):
            settings = load_settings(env)
            setup_logging(settings.log_level, log_format=settings.log_format)
            return asyncio.run(
                claim_or_status(
                    settings, claim=args.command == "claim", force=args.force if args.command == "claim" else False
                )
            )
        return serve(env)
    except ConfigError as exc:
        print(f"drain-provider: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def serve(env: dict[str, str]) -> int:
    settings = load_settings(env)
    setup_logging(settings.log_level, log_format=settings.log_format)
    from .api import create_app, reload_prices
    from .process import run
    from .server import Listener
    from .server import serve as serve_app

    app = create_app(settings)
    log.info(
        "starting provider=%s chain_id=%d contracts=%s upstream=%s host=%s port=%d",
        settings.provider_address,
        settings.chain_id,
        ",".join(f"{c.address}:{c.version}" for c in settings.contracts),
        settings.upstream_base_url,
        settings.host,
        settings.port,
    )
    started = time.monotonic()
    listener = Listener(
        app,
        settings.host,
        settings.port,
        max_connections=settings.max_connections,
        header_timeout=settings.header_timeout,
    )
    run(serve_app(listener, on_hangup=lambda: reload_prices(app, read_environment())))
    log.info("stopped uptime_s=%d", time.monotonic() - started)
    return 0


async def claim_or_status(settings: Settings, *, claim: bool, force: bool) -> int:
    """`claim` and `status`: the same ledger and chain as the server, without the server. Safe
    while it runs: claims in flight are one per channel across processes (the ledger decides)."""
    from eth_account import Account

    from .chain import ChainClient, ChainClock, ChainUnavailable
    from .chainwatch import ChainWatcher
    from .checks import open_ledger, require_chain
    from .claimer import Claimer
    from .reports import claim_json, cycle_report, status_report
    from .states import ClaimStatus

    assert settings.rpc_url is not None
    ledger = await open_ledger(settings)
    primary = settings.contracts[0]
    chain = ChainClient.over_http(settings.rpc_url, primary.address, version=primary.version)
    chains = [chain.for_contract(contract) for contract in settings.contracts]  # each channel on its own
    watcher = ChainWatcher(ledger, chains, ChainClock(), poll_interval=settings.chain_poll_interval)
    try:
        await require_chain(chains, settings)
        if not claim:
            report = await status_report(settings, ledger, chain, None, watcher)
            report["pendingClaims"] = [claim_json(r) for r in await ledger.claims(status=ClaimStatus.PENDING)]
            print(json.dumps(report, indent=2))
            return 0
        claimer = Claimer(ledger, chain, Account.from_key(settings.provider_private_key), settings, watcher)
        try:
            outcomes = [*await claimer.reconcile(), *await claimer.cycle(force=force)]
        except ChainUnavailable as exc:
            print(f"drain-provider: the chain RPC is unavailable: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(cycle_report(outcomes, force=force, alert=claimer.alert), indent=2))
        return 1 if any(o.status is ClaimStatus.FAILED for o in outcomes) else 0
    finally:
        await chain.close()
        await ledger.close()
