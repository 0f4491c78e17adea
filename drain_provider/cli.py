"""The command line: `serve` (the default) runs the provider, `dev` runs everything locally,
`doctor` checks what the provider depends on, `keygen`, `withdraw` and `backup` look after its
key, its earnings and its ledger, `migrate-ledger` moves the ledger to PostgreSQL, `usage` lists
the paid requests, `consumer` pays one (the consumer kit's CLI)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import __version__
from .backup import BackupError, run_backup
from .config import ConfigError, Settings, database_path, load_settings, read_environment, read_setting
from .keystore import DEFAULT_KEYSTORE, KeystoreError, keygen
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
    dev = commands.add_parser(
        "dev",
        help="embedded chain + contracts + demo consumer + provider + demo model; reads no settings unless --env",
    )
    node = dev.add_mutually_exclusive_group()
    node.add_argument("--rpc-url", help="use this dev node (anvil, hardhat) instead of the embedded chain")
    node.add_argument(
        "--anvil", action="store_true", help="start anvil (from npm install) for outside clients, stopped with dev"
    )
    dev.add_argument("--anvil-port", type=int, default=8545, help="the port of --anvil's JSON-RPC (default: 8545)")
    dev.add_argument("--port", type=int, help="port for the provider (default: 3000; with --env, PORT or 3000)")
    dev.add_argument("--no-serve", action="store_true", help="exit after the demo call instead of serving")
    dev.add_argument(
        "--upstream", metavar="URL", help="sell one model of this OpenAI-compatible API instead of the demo model"
    )
    dev.add_argument(
        "--upstream-key-env",
        metavar="NAME",
        help="with --upstream: the environment (or .env) variable holding its API key (default: OPENAI_API_KEY)",
    )
    dev.add_argument("--model", help="with --upstream: the model sold and called (default: gpt-4o-mini)")
    dev.add_argument(
        "--env", action="store_true", help="read .env and the environment as serve does (not the chain, key, ledger)"
    )
    claim = commands.add_parser("claim", help="claim what is due now, with or without the server running")
    claim.add_argument("--force", action="store_true", help="claim every channel with unclaimed earnings")
    commands.add_parser("status", help="earnings, claims and gas balance, as JSON")
    commands.add_parser("doctor", help="check the settings, ledger, chain, contract, gas and upstream; print a table")
    keygen = commands.add_parser("keygen", help="a new provider key, in an encrypted keystore file (0600)")
    keygen.add_argument("--out", type=Path, default=DEFAULT_KEYSTORE, help=f"default: {DEFAULT_KEYSTORE}")
    password = keygen.add_mutually_exclusive_group()
    password.add_argument("--password-file", type=Path, help="read the password from this file's first line")
    password.add_argument("--new-password-file", type=Path, help="make a strong password and write it here (0600)")
    withdraw = commands.add_parser("withdraw", help="send the account's USDC to PAYOUT_ADDRESS; the gas stays")
    withdraw.add_argument("--amount", help="USDC to send, such as 12.5 (default: all of it)")
    withdraw.add_argument("--to", help="the address to send to (default: PAYOUT_ADDRESS)")
    withdraw.add_argument("--yes", action="store_true", help="send without asking")
    backup = commands.add_parser("backup", help="copy the ledger to a new file, safe while the server runs")
    backup.add_argument("--out", type=Path, help="default: backup-<UTC time>.db beside DATABASE_PATH")
    migrate = commands.add_parser(
        "migrate-ledger", help="copy the SQLite ledger into an empty PostgreSQL database (stop the server first)"
    )
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://user:password@host:5432/db")
    migrate.add_argument("--from", dest="source", type=Path, help="the SQLite ledger (default: DATABASE_PATH)")
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
        if args.command == "migrate-ledger":
            from .migrate_ledger import run_migrate

            return run_migrate(args.source or database_path(env), args.to)
        if args.command in ("keygen", "withdraw", "backup"):
            return keys_and_payouts(args, env)
        if args.command == "dev":
            from .devtools.dev import DevOptions, run_dev

            return asyncio.run(run_dev(env, DevOptions.from_args(args), started=started))
        if args.command == "usage":
            from .usage_view import FILTERS, run_usage

            wanted = {name: getattr(args, name) for name in FILTERS if getattr(args, name) is not None}
            return run_usage(
                read_setting("DATABASE_PATH", env), wanted, as_json=args.json, url=read_setting("DATABASE_URL", env)
            )
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
    except (KeystoreError, BackupError) as exc:
        print(f"drain-provider: {exc}", file=sys.stderr)
        return exc.code if isinstance(exc, BackupError) else 2
    except KeyboardInterrupt:
        return 0


def keys_and_payouts(args: argparse.Namespace, env: dict[str, str]) -> int:
    if args.command == "keygen":
        return keygen(args.out, args.password_file, args.new_password_file)
    if args.command == "backup":
        if read_setting("DATABASE_URL", env):
            raise BackupError("backup copies the SQLite ledger; with DATABASE_URL, back up with pg_dump (README)", 2)
        return run_backup(database_path(env), args.out)
    from .payout import WithdrawError, run_withdraw

    settings = load_settings(env)
    setup_logging("DEBUG" if settings.log_level == "DEBUG" else "ERROR")  # what it did is printed
    try:
        return asyncio.run(run_withdraw(settings, amount=args.amount, to=args.to, yes=args.yes))
    except WithdrawError as exc:
        print(f"drain-provider: {exc}", file=sys.stderr)
        return exc.code


def serve(env: dict[str, str]) -> int:
    settings = load_settings(env)
    setup_logging(settings.log_level, log_format=settings.log_format)
    from .api import create_app, reload_prices
    from .ledger import shown_url
    from .process import run
    from .server import Listener
    from .server import serve as serve_app

    app = create_app(settings)
    log.info(
        "starting provider=%s chain_id=%d contracts=%s upstream=%s models=%d ledger=%s ledger_at=%s host=%s port=%d",
        settings.provider_address,
        settings.chain_id,
        ",".join(f"{c.address}:{c.version}" for c in settings.contracts),
        settings.upstream_base_url
        if settings.catalog.derived
        else ",".join(f"{name}={spec.base_url}" for name, spec in settings.catalog.upstreams.items()),
        len(settings.catalog.names),
        "postgresql" if settings.database_url else "sqlite",
        shown_url(settings.database_url) if settings.database_url else settings.database_path,
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
    while it runs: claims in flight are one per channel across processes (the ledger decides).
    On a PostgreSQL ledger `claim` runs only if no instance is the claimer (exit 2 otherwise)."""
    from eth_account import Account

    from .chain import ChainClient, ChainClock, ChainUnavailable
    from .chainwatch import ChainWatcher
    from .checks import bind_ledger, open_unbound_ledger, require_chain
    from .claimer import Claimer
    from .reports import claim_json, cycle_report, status_report
    from .states import ClaimStatus

    assert settings.rpc_url is not None
    ledger = await open_unbound_ledger(settings)
    primary = settings.contracts[0]
    chain = ChainClient.over_http(settings.rpc_url, primary.address, version=primary.version)
    chains = [chain.for_contract(contract) for contract in settings.contracts]  # each channel on its own
    watcher = ChainWatcher(ledger, chains, ChainClock(), poll_interval=settings.chain_poll_interval)
    try:
        await require_chain(chains, settings)
        await bind_ledger(ledger, settings)  # once the chain is checked, as the server does
        if not claim:
            report = await status_report(settings, ledger, chain, None, watcher)
            report["pendingClaims"] = [claim_json(r) for r in await ledger.claims(status=ClaimStatus.PENDING)]
            print(json.dumps(report, indent=2))
            return 0
        claimer = Claimer(ledger, chain, Account.from_key(settings.provider_private_key), settings, watcher)
        if not await claimer.lead():  # several instances on one PostgreSQL ledger: one claims
            print("drain-provider: another instance is the claimer", file=sys.stderr)
            return 2
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
