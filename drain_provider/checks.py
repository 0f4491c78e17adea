"""What the provider depends on, checked: by `serve` (and `claim`, `status`, `dev`) at start, and
all of them, as a table, by `python -m drain_provider doctor`.

A problem the operator must fix before anything can work (a ledger that cannot be opened, an RPC
that serves another chain, no contract at DRAIN_CONTRACT or at the V1 served beside it) stops the
start with one line naming the setting (`ConfigError`). What may fix itself (an RPC or an upstream
that is down, low gas) is a warning: the server starts, serves known channels from the ledger, and
/health says what is wrong until it is not. Each check is a `Check` row, so the start-up log and `doctor` say the
same things. No check shows more of a URL than its scheme and host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlparse

import asyncpg

from .catalog import Catalog, UpstreamSpec
from .chain import ChainClient, ChainUnavailable
from .config import ConfigError, Settings
from .gas import GasGauge, GasLevel, format_gas
from .ledger import ENGINE_ERRORS, Ledger, LedgerMismatch, make_ledger, shown_address, shown_url
from .ledger.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from .upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)


class Result(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    result: Result
    detail: str
    fix: str = ""
    setting: str = ""  # the variable a failure is blamed on, when it stops the start


def redact_url(url: str) -> str:
    """Scheme, host and port: a URL's path or query may carry an API key."""
    parsed = urlparse(url)
    host = f"[{parsed.hostname}]" if ":" in (parsed.hostname or "") else parsed.hostname
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}"


# --- the ledger -------------------------------------------------------------------------------

# A PostgreSQL server that does not answer stops the start after this long (seconds).
LEDGER_CONNECT_TIMEOUT = 10.0


def _ledger_problem(path: Path, exc: BaseException) -> str:
    """What is wrong with DATABASE_PATH, in words, without its value."""
    message = str(exc).lower()
    if path.is_dir():
        return "is a directory; name a file in it, such as data/drain.db"
    if isinstance(exc, OSError) and not path.parent.is_dir():
        if any(parent.is_file() for parent in path.parents):
            return "a file stands where its directory should be"
        return f"its directory cannot be created ({exc.strerror})"
    if isinstance(exc, OSError) and not path.exists():
        return f"cannot be opened or created: check that its directory is writable ({exc.strerror})"
    if isinstance(exc, PermissionError) or "readonly" in message or "read-only" in message:
        return "is not writable: the server must write the file and its directory (the WAL files live beside it)"
    if "not a database" in message:
        return "is not a SQLite database: move the file away or name another one"
    if "unable to open" in message:
        return "cannot be opened or created: check that its directory exists and is writable"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return f"cannot be opened ({reason})"


async def open_ledger(settings: Settings) -> Ledger:
    """The ledger, open and bound to this chain and contract (`open_unbound_ledger`, then
    `bind_ledger`), or a ConfigError naming DATABASE_PATH."""
    ledger = await open_unbound_ledger(settings)
    try:
        await bind_ledger(ledger, settings)
    except BaseException:
        await ledger.close()
        raise
    return ledger


async def open_unbound_ledger(settings: Settings) -> Ledger:
    """The ledger opened (and migrated), or a ConfigError naming DATABASE_PATH or DATABASE_URL:
    never a traceback, never a hang on a server that does not answer, and nothing left running.
    A start finds a bad ledger first, before any slow check; it binds the ledger only once the
    chain is checked (`bind_ledger`)."""
    ledger = make_ledger(settings.database_path, url=settings.database_url, synchronous=settings.ledger_sync)
    try:
        if settings.database_url:
            await asyncio.wait_for(ledger.open(), LEDGER_CONNECT_TIMEOUT)
        else:
            await ledger.open()
    except ENGINE_ERRORS as exc:
        await ledger.close()
        raise ledger_error(settings, exc) from None
    return ledger


async def bind_ledger(ledger: Ledger, settings: Settings) -> None:
    """Bind the ledger to this chain and contract (a new one), or check that it is theirs: a
    ConfigError naming DATABASE_PATH (or DATABASE_URL) if not. After `require_chain`, so that a
    start refused for its chain id or contract never leaves a new ledger bound to the wrong ones."""
    try:
        await ledger.bind(
            chain_id=settings.chain_id,
            contract=settings.drain_contract,
            served=[contract.address for contract in settings.contracts],
        )
    except LedgerMismatch as exc:
        raise ConfigError(f"{_ledger_setting(settings)}: {exc}") from None
    except ENGINE_ERRORS as exc:
        raise ledger_error(settings, exc) from None


def _ledger_setting(settings: Settings) -> str:
    return "DATABASE_URL" if settings.database_url else "DATABASE_PATH"


def ledger_error(settings: Settings, exc: BaseException) -> ConfigError:
    """The one line a ledger that cannot be used stops the start with."""
    if settings.database_url:
        return ConfigError(f"DATABASE_URL: {shown_url(settings.database_url)} {postgres_problem(exc)}")
    return ConfigError(f"DATABASE_PATH: {_ledger_problem(settings.database_path, exc)}")


def postgres_problem(exc: BaseException) -> str:
    """Why a PostgreSQL server did not let us in, in words, without the URL (it holds a password)."""
    if isinstance(exc, TimeoutError):
        return f"does not answer (no connection within {LEDGER_CONNECT_TIMEOUT:g} s)"
    if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return "refuses the login: check the user and password"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return "has no such database: create it first (createdb)"
    if isinstance(exc, asyncpg.PostgresError):
        return f"refuses ({type(exc).__name__}, SQLSTATE {exc.sqlstate})"
    if isinstance(exc, ValueError):  # asyncpg's ClientConfigurationError
        return "is not a valid PostgreSQL URL"
    if isinstance(exc, ConnectionRefusedError):
        return "refuses connections: is PostgreSQL running there?"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot be reached ({exc.strerror})"
    return f"cannot be used: not PostgreSQL, or the connection was lost ({type(exc).__name__})"


def inspect_ledger(settings: Settings) -> Check:
    """`doctor`'s look at the SQLite ledger, read-only: it must not create the file, nor bind it to a
    contract the operator is still fixing."""
    path = settings.database_path
    if not path.exists():
        if any(parent.is_file() for parent in path.parents):
            return Check("ledger", Result.FAIL, f"{path}: a file stands where its directory should be", "move it")
        nearest = next((p for p in path.absolute().parents if p.exists()), Path("/"))
        if not os.access(nearest, os.W_OK):
            return Check("ledger", Result.FAIL, f"{path} cannot be created", "make its directory writable")
        return Check("ledger", Result.OK, f"{path} does not exist yet: the server creates it at its first start")
    try:
        with contextlib.closing(sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = dict(conn.execute("SELECT key, value FROM ledger_meta")) if "ledger_meta" in tables else {}
    except (sqlite3.Error, OSError) as exc:
        problem = _ledger_problem(path, exc)
        return Check("ledger", Result.FAIL, f"{path} {problem}", "set DATABASE_PATH to the ledger's file")
    mismatch = _binding_mismatch(str(path), meta, settings)
    if mismatch is not None:
        return mismatch
    if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        return Check("ledger", Result.FAIL, f"{path} is read-only", "let the server write the file and its directory")
    return Check("ledger", Result.OK, f"{path}: {_binding(meta)}")


def _binding(meta: Mapping[str, str]) -> str:
    return "bound to this chain and contract" if "chain_id" in meta else "not bound yet"


def _binding_mismatch(where: str, meta: Mapping[str, str], settings: Settings) -> Check | None:
    """A FAIL row if the ledger (its ledger_meta) is bound to another chain or contract."""
    bound = (meta.get("chain_id"), meta.get("contract"))
    served = {contract.address.lower() for contract in settings.contracts}
    if bound == (None, None) or (bound[0] == str(settings.chain_id) and bound[1] in served):
        return None
    setting = _ledger_setting(settings)
    return Check(
        "ledger",
        Result.FAIL,
        f"{where} belongs to chain {bound[0]} contract {shown_address(bound[1])}",
        f"set {setting} to another ledger, or CHAIN_ID and DRAIN_CONTRACT to the ledger's",
    )


async def check_ledger(settings: Settings) -> Check:
    """`doctor`'s ledger row, of the engine the settings name."""
    return await inspect_postgres(settings) if settings.database_url else inspect_ledger(settings)


async def inspect_postgres(settings: Settings) -> Check:
    """`doctor`'s look at a PostgreSQL ledger, in a read-only transaction: the server lets us in,
    the schema's version is one we know (none yet: the first start creates it), and the ledger
    is bound to this chain and contract if to any. Creates nothing and binds nothing."""
    assert settings.database_url is not None
    where = shown_url(settings.database_url)
    fix = "set DATABASE_URL to a PostgreSQL database this user may use (postgresql://user:password@host/db)"
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=LEDGER_CONNECT_TIMEOUT)
    except ENGINE_ERRORS as exc:
        return Check("ledger", Result.FAIL, f"{where} {postgres_problem(exc)}", fix)
    try:
        async with conn.transaction(readonly=True):
            version: int | None = None
            meta: dict[str, str] = {}
            if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
                version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            if await conn.fetchval("SELECT to_regclass('ledger_meta') IS NOT NULL"):
                meta = {row["key"]: row["value"] for row in await conn.fetch("SELECT key, value FROM ledger_meta")}
    except ENGINE_ERRORS as exc:
        return Check("ledger", Result.FAIL, f"{where} {postgres_problem(exc)}", fix)
    finally:
        await conn.close()
    if version is None:
        return Check("ledger", Result.OK, f"{where}: no ledger yet: the server creates its schema at its first start")
    known = len(POSTGRES_MIGRATIONS)
    if version > known:
        detail = f"{where}: schema version {version}, newer than this drain-provider knows ({known})"
        return Check("ledger", Result.FAIL, detail, "run the drain-provider version that wrote it, or a newer one")
    mismatch = _binding_mismatch(where, meta, settings)
    if mismatch is not None:
        return mismatch
    return Check("ledger", Result.OK, f"{where}: schema version {version}, {_binding(meta)}")


# --- the chain --------------------------------------------------------------------------------


async def check_chain(chains: ChainClient | Sequence[ChainClient], settings: Settings) -> list[Check]:
    """The RPC answers and serves CHAIN_ID, and each contract served (`chains`: a client per
    contract, the primary first) has code and looks like its version: V2 answers `feeBps()`, V1
    does not. Stops at the first failure: the next checks would mean nothing."""
    chains = (chains,) if isinstance(chains, ChainClient) else tuple(chains)
    where = redact_url(settings.rpc_url) if settings.rpc_url else "the chain"  # dev and tests pass a client
    try:
        chain_id = await chains[0].chain_id()
        number, timestamp = await chains[0].head()
    except ChainUnavailable as exc:
        fix = "check RPC_URL and that the node is up; known channels are still served from the ledger"
        return [Check("rpc", Result.WARN, f"{where} does not answer ({exc})", fix)]
    age = max(0, int(time.time() - timestamp))
    checks = [Check("rpc", Result.OK, f"{where} answers: block {number}, {age} s old")]
    if chain_id != settings.chain_id:
        detail = f"set to {settings.chain_id}, but RPC_URL serves chain {chain_id}"
        return [*checks, Check("chain id", Result.FAIL, detail, "set CHAIN_ID or RPC_URL so they agree", "CHAIN_ID")]
    checks.append(Check("chain id", Result.OK, str(chain_id)))
    for index, chain in enumerate(chains):
        check = await _check_contract(chain, chain_id, beside=index > 0)
        checks.append(check)
        if check.result is Result.FAIL:
            break
    return checks


async def _check_contract(chain: ChainClient, chain_id: int, *, beside: bool) -> Check:
    """One contract: code at its address, and the version it is served as (`beside`: not the
    primary, a V1 served beside the V2)."""
    setting = "DRAIN_CONTRACT_V1" if beside else "DRAIN_CONTRACT"
    try:
        if not await chain.has_code():
            detail = f"no contract at its address on chain {chain_id} (the {chain.version} contract)"
            fix = f"set {setting} to the DrainChannel address on this chain, or check CHAIN_ID and RPC_URL"
            return Check("contract", Result.FAIL, detail, fix, setting)
        v2 = await chain.looks_like_v2()
    except ChainUnavailable as exc:
        return Check("contract", Result.WARN, f"{chain.address} could not be read ({exc})", "check the RPC")
    found = "v2" if v2 else "v1 (or not a DrainChannel: no feeBps())"
    if ("v2" if v2 else "v1") != chain.version:
        detail = f"{chain.address} looks like {found}, but is served as {chain.version}"
        return Check("contract", Result.WARN, detail, f"check {setting} and DRAIN_CONTRACT_VERSION")
    return Check("contract", Result.OK, f"{chain.address}, {found}")


async def require_chain(chain: ChainClient | Sequence[ChainClient], settings: Settings) -> None:
    """At start: a chain that cannot work is a ConfigError; an RPC that is down or a contract
    that looks odd is a warning (the server starts: known channels are served from the ledger,
    new ones get a clear 503 until the RPC answers)."""
    checks = await check_chain(chain, settings)
    for check in checks:
        if check.result is Result.FAIL:
            raise ConfigError(f"{check.setting}: {check.detail} ({check.fix})")
    log_checks(checks)


def gas_check(gauge: GasGauge) -> Check:
    """The provider's gas, from a gauge that has been read."""
    balance, left = gauge.balance or 0, gauge.claims_left
    detail = f"{format_gas(balance)} ({balance} wei)" + ("" if left is None else f", about {left} claims' worth")
    fix = f"send gas tokens (POL on Polygon) to {gauge.address}"
    if gauge.level is GasLevel.EMPTY:
        return Check("gas", Result.FAIL, f"{detail}: not enough for one claim", fix)
    if gauge.level is GasLevel.LOW:
        return Check("gas", Result.WARN, f"{detail}, below LOW_GAS_CLAIMS={gauge.low_claims}", fix)
    return Check("gas", Result.OK, detail)


# --- the upstream -----------------------------------------------------------------------------


async def check_upstream(upstream: Upstream, priced: list[str], spec: UpstreamSpec | None = None) -> list[Check]:
    """GET /models answers with our key, and lists the models we sell there (one it does not list
    may be named otherwise there: a warning). An upstream that does not answer is a warning (it
    may come up later); one that refuses the key is a failure. `spec`: the upstream of MODELS_FILE
    (checks named after it, fixes naming its keys); None: the upstream of UPSTREAM_BASE_URL."""
    where = redact_url(upstream.base_url)
    label = "upstream" if spec is None else f"upstream {spec.name}"
    if spec is None:
        key_fix, url_fix = "check OPENAI_API_KEY", "check UPSTREAM_BASE_URL"
        names_fix = "price the upstream's model names (PRICING_FILE), or drop these"
    else:
        key_fix = f"check {spec.api_key_env}" if spec.api_key_env else f"set upstreams.{spec.name}.api_key_env"
        url_fix = f"check upstreams.{spec.name}.base_url in MODELS_FILE"
        names_fix = "set upstream_model in MODELS_FILE to the upstream's names, or drop these"
    try:
        listed = set(await upstream.models())
    except UpstreamError as exc:
        status = exc.upstream_status
        if status in (401, 403):
            return [Check(label, Result.FAIL, f"{where} refuses the key (status {status})", key_fix)]
        what = f"status {status}" if status else upstream.health.last_error
        return [Check(label, Result.WARN, f"{where} /models fails ({what})", url_fix)]
    checks = [Check(label, Result.OK, f"{where} answers, {len(listed)} models listed")]
    missing = sorted(set(priced) - listed)
    if missing:
        detail = f"priced but not listed by the upstream: {', '.join(missing)}"
        checks.append(Check("models" if spec is None else f"models {spec.name}", Result.WARN, detail, names_fix))
    return checks


async def check_upstreams(catalog: Catalog, upstreams: Mapping[str, Upstream]) -> list[Check]:
    """`check_upstream` of each of `upstreams` (clients of the catalog's upstreams, by name), at
    once, for the names the catalog's models have there."""
    names = list(upstreams)
    results = await asyncio.gather(
        *(
            check_upstream(
                upstreams[name],
                sorted({r.upstream_model for r in catalog.routes.values() if r.upstream == name}),
                None if catalog.derived else catalog.upstreams[name],
            )
            for name in names
        )
    )
    return [check for result in results for check in result]


def log_checks(checks: list[Check]) -> None:
    """The start-up log of checks that did not pass: one line each."""
    for check in checks:
        if check.result is not Result.OK:
            name = check.name.replace(" ", "_")
            log.warning(
                'start_check name=%s result=%s detail="%s" fix="%s"', name, check.result, check.detail, check.fix
            )
