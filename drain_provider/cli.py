"""The command line: `serve` (the default) runs the provider, `dev` runs everything locally."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from aiohttp import web

from .config import ConfigError, load_settings, read_environment

log = logging.getLogger("drain_provider")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    # web3 logs full RPC requests at DEBUG; they may carry signed payloads but never keys.
    logging.getLogger("web3").setLevel(max(logging.INFO, logging.getLevelName(level)))


def main(argv: list[str] | None = None, *, started: float | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drain_provider", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the provider (the default)")
    dev = commands.add_parser("dev", help="embedded chain + contracts + demo consumer + provider, nothing to configure")
    dev.add_argument("--rpc-url", help="use this dev node (anvil, hardhat) instead of the embedded chain")
    dev.add_argument("--port", type=int, help="port for the provider (default: PORT or 3000)")
    dev.add_argument("--no-serve", action="store_true", help="exit after the demo call instead of serving")
    args = parser.parse_args(argv)
    env = read_environment()
    try:
        if args.command == "dev":
            from .dev import run_dev

            return asyncio.run(
                run_dev(env, rpc_url=args.rpc_url, port=args.port, serve=not args.no_serve, started=started)
            )
        return serve(env)
    except ConfigError as exc:
        print(f"drain-provider: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def serve(env: dict[str, str]) -> int:
    settings = load_settings(env)
    setup_logging(settings.log_level)
    from .api import RUNNER_OPTIONS, create_app

    app = create_app(settings)
    log.info(
        "starting provider=%s chain_id=%d contract=%s upstream=%s host=%s port=%d",
        settings.provider_address,
        settings.chain_id,
        settings.drain_contract,
        settings.upstream_base_url,
        settings.host,
        settings.port,
    )
    started = time.monotonic()
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None, **RUNNER_OPTIONS)
    log.info("stopped uptime_s=%d", time.monotonic() - started)
    return 0
