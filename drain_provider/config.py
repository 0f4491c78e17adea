"""Settings from the environment and `.env`.

`SETTINGS` is the one table of environment variables: each entry names the `Settings` field it
fills, the parser that checks it, its default, and the help text that `env.example` and the
README's settings table are generated from, so that the code, the example file and the docs
cannot drift apart. `load_settings` reads the table, then applies the few rules that tie one
setting to another.

Every problem is a `ConfigError` whose message names the variable and the rule its value breaks,
so the CLI can print one line and exit 2. No message quotes the value it refuses: a secret
pasted on the wrong line (an API key as PORT) must not end up in a log, so none is echoed,
whichever variable it was set as. Secret values are not in a repr either.
"""

from __future__ import annotations

import ipaddress
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlparse

from dotenv import dotenv_values
from eth_keys.datatypes import PrivateKey
from eth_utils.address import is_hex_address, to_checksum_address

from .catalog import Catalog, CatalogError, Kind, derived_catalog, read_catalog
from .keystore import KeystoreError, decrypt_keystore
from .pricing import DEFAULT_PRICES, ModelPrice, PricingError, apply_env_overrides, env_names, load_pricing_file
from .protocol import DEPLOYMENTS, SECP256K1_N, ContractRef, parse_usdc
from .states import LogFormat, PaymentMode, SyncMode

OPENAI_BASE_URL = "https://api.openai.com/v1"

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("::1"))


class ConfigError(Exception):
    """A setting is missing or wrong. str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Settings:
    provider_private_key: bytes = field(repr=False)
    chain_id: int
    drain_contract: str  # the primary contract: the V2 one when there is one (402 discovery)
    contract_version: str  # the primary contract's version, "v1" or "v2"
    rpc_url: str | None  # None: the embedded chain of `dev` and the tests
    provider_keystore: Path | None = None  # where provider_private_key was decrypted from, if so
    provider_keystore_password_file: Path | None = None
    payout_address: str | None = None  # where `withdraw` sends the USDC earned
    host: str = "0.0.0.0"
    port: int = 3000
    max_connections: int = 1000
    header_timeout: float = 15.0
    public_url: str | None = None
    upstream_base_url: str = OPENAI_BASE_URL
    openai_api_key: str | None = field(default=None, repr=False)
    upstream_timeout: float = 300.0
    max_answer_bytes: int = 8 * 1024 * 1024
    database_path: Path = Path("data/drain.db")
    database_url: str | None = field(default=None, repr=False)
    instance_timeout: float = 30.0
    ledger_sync: SyncMode = SyncMode.FULL
    prices: Mapping[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    claim_threshold: int = 10_000_000
    claim_interval: float = 60.0
    chain_poll_interval: float = 5.0
    gas_token_price: int = 1_000_000  # USDC base units per whole gas token (POL)
    claim_retry_seconds: float = 30.0  # first backoff after a failed claim; doubles up to an hour
    claim_receipt_timeout: float = 180.0
    max_fee_per_gas: int = 1000 * 10**9  # wei; a claim waits rather than pay more
    low_gas_claims: int = 10  # warn when the gas balance pays for fewer claims than this
    min_channel_ttl: int = 600
    admin_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = 1024 * 1024
    body_timeout: float = 30.0
    payment_failures_per_minute: int = 60
    trusted_proxies: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    allowed_hosts: tuple[str, ...] | None = None  # None: the loopback names and HOST
    cors_origins: tuple[str, ...] = ("*",)  # ("*",): any origin; (): CORS off
    default_max_tokens: int = 4096
    min_output_tokens: int = 16
    close_requires_signature: bool = False
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.TEXT
    metrics_port: int | None = None  # None: /metrics on the main port only, behind ADMIN_TOKEN
    metrics_host: str = "127.0.0.1"
    payment_mode: PaymentMode = PaymentMode.ENFORCE
    drain_contract_v1: str | None = None  # as set; `contracts` holds what it means
    # Every contract served, the primary first. Empty when built by hand: then the primary alone.
    contracts: tuple[ContractRef, ...] = ()
    models_file: Path | None = None
    # What is sold and where: MODELS_FILE's catalog (then `prices` are its prices), or None: the
    # catalog derived from `prices`, UPSTREAM_BASE_URL and OPENAI_API_KEY (see `catalog`).
    routing: Catalog | None = None  # its repr shows no key (UpstreamSpec.api_key is repr=False)

    def __post_init__(self) -> None:
        if not self.contracts:
            object.__setattr__(self, "contracts", (ContractRef(self.drain_contract, self.contract_version),))
        if self.routing is None or self.routing.derived:  # derived again: `replace` may have changed its sources
            object.__setattr__(
                self, "routing", derived_catalog(self.prices, self.upstream_base_url, self.openai_api_key)
            )

    @property
    def catalog(self) -> Catalog:
        """The models sold and their upstreams: the one path, with MODELS_FILE or without."""
        assert self.routing is not None
        return self.routing

    @property
    def provider_address(self) -> str:
        return str(PrivateKey(self.provider_private_key).public_key.to_checksum_address())


def read_environment(env_file: str | os.PathLike[str] | None = ".env") -> dict[str, str]:
    """The process environment over the values of `.env` (the environment wins, as with
    python-dotenv's default), as one plain mapping."""
    merged: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ)
    return merged


# --- parsers ----------------------------------------------------------------------------------
# A parser takes the variable's name (the one actually set, which may be an alias) and its
# stripped, non-empty value, and returns the typed value or raises a ConfigError naming the
# variable and the rule the value breaks, never the value: any variable may hold a secret
# pasted on the wrong line.

T = TypeVar("T")
S = TypeVar("S", bound=str)
Parser: TypeAlias = Callable[[str, str], T]

_MAX_INT = 2**63 - 1
_YEAR = 365 * 86400


def _whole(minimum: int = 0, maximum: int = _MAX_INT) -> Parser[int]:
    def parse(name: str, raw: str) -> int:
        rule = f"must be a whole number from {minimum} to {maximum}"
        if not (raw.isascii() and raw.isdigit()):
            raise ConfigError(f"{name}: {rule}, digits only")
        # len first: int() refuses more than 4300 digits with its own error
        if len(raw) > 19 or not minimum <= int(raw) <= maximum:
            raise ConfigError(f"{name}: {rule}")
        return int(raw)

    return parse


def _gwei(name: str, raw: str) -> int:
    """Operators think of gas prices in gwei; the chain client wants wei."""
    return _whole(1, 10**9)(name, raw) * 10**9


def _seconds(*, allow_zero: bool = False) -> Parser[float]:
    def parse(name: str, raw: str) -> float:
        rule = f"must be a number of seconds, {'0 or ' if allow_zero else ''}above 0 and below 86400"
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}: {rule}") from None
        if not (0 < value < 86400 or (allow_zero and value == 0)):  # NaN fails both
            raise ConfigError(f"{name}: {rule}")
        return value

    return parse


def _choice(*choices: S) -> Parser[S]:
    """Case-insensitive, and the value is returned spelled as in `choices` (an enum's member when
    they are one), so that the rest of the code compares against one spelling."""
    by_key = {choice.lower(): choice for choice in choices}
    expected = ", ".join(choices[:-1]) + f" or {choices[-1]}"

    def parse(name: str, raw: str) -> S:
        try:
            return by_key[raw.lower()]
        except KeyError:
            raise ConfigError(f"{name}: must be {expected}") from None

    return parse


def _url(name: str, raw: str) -> str:
    try:
        parsed = urlparse(raw)
        valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:  # e.g. "http://[abc": an unclosed IPv6 bracket
        raise ConfigError(f"{name}: is not a valid URL") from None
    if not valid:
        raise ConfigError(f"{name}: must be an http:// or https:// URL with a host")
    return raw.rstrip("/")


def parse_private_key(name: str, raw: str) -> bytes:
    digits = raw[2:] if raw.startswith(("0x", "0X")) else raw
    key = bytes.fromhex(digits) if len(digits) == 64 and all(c in "0123456789abcdefABCDEF" for c in digits) else b""
    if len(key) != 32:
        raise ConfigError(f"{name}: must be 32 bytes as 64 hex digits (0x-prefixed or not)")
    if not 0 < int.from_bytes(key, "big") < SECP256K1_N:
        raise ConfigError(f"{name}: is not a valid secp256k1 private key")
    return key


def _address(name: str, raw: str) -> str:
    if not is_hex_address(raw):
        raise ConfigError(f"{name}: must be a 0x-prefixed 20-byte address (40 hex digits)")
    return str(to_checksum_address(raw))


def _usdc(name: str, raw: str) -> int:
    """A decimal USDC amount (0.25) as base units, without floats."""
    base_units = parse_usdc(raw, whole_digits=12)
    if base_units is None:
        raise ConfigError(f"{name}: must be a decimal USDC amount with at most 6 decimals, like 0.25")
    return base_units


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _flag(name: str, raw: str) -> bool:
    value = raw.lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"{name}: must be true or false")
    return value in _TRUE


def _admin_token(name: str, raw: str) -> str:
    if len(raw) < 16:
        raise ConfigError(f"{name}: must be at least 16 characters (try: openssl rand -hex 32)")
    return raw


def _text(name: str, raw: str) -> str:
    return raw


def _networks(name: str, raw: str) -> tuple[IPNetwork, ...]:
    """Comma-separated addresses or networks (10.0.0.0/8); `none` for none."""
    if raw.lower() == "none":
        return ()
    networks = []
    for position, part in enumerate(filter(None, (p.strip() for p in raw.split(","))), 1):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: entry {position} is not an IP address or network (like 10.0.0.0/8)") from None
    return tuple(networks)


_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _hostnames(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated host names or IP addresses, without ports, as a Host header names them
    (lower case; an IPv6 address with or without its brackets)."""
    hosts = []
    for position, part in enumerate(filter(None, (p.strip().lower() for p in raw.split(","))), 1):
        host = part[1:-1] if part.startswith("[") and part.endswith("]") else part
        try:
            hosts.append(str(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(f"{name}: entry {position} is not a host name or IP address (no scheme, no port)")
        hosts.append(host)
    return tuple(hosts)


def _origins(name: str, raw: str) -> tuple[str, ...]:
    """`*`, `none`, or comma-separated origins (scheme://host[:port], as a browser's Origin
    header writes them: lower case, no path), each kept in that form so that comparing it with
    the header is plain string equality."""
    if raw == "*":
        return ("*",)
    if raw.lower() == "none":
        return ()
    origins = []
    for position, part in enumerate(filter(None, (p.strip() for p in raw.split(","))), 1):
        rule = f"{name}: entry {position} must be an origin like https://app.example.com (scheme, host, port; no path)"
        try:
            parsed = urlparse(part)
            port = parsed.port
        except ValueError:
            raise ConfigError(rule) from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
            raise ConfigError(rule)
        if parsed.query or parsed.fragment or parsed.username or parsed.password:
            raise ConfigError(rule)
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        default_port = {"http": 80, "https": 443}[parsed.scheme]  # a browser leaves it out
        origins.append(f"{parsed.scheme}://{host}" + (f":{port}" if port not in (None, default_port) else ""))
    return tuple(origins)


_BIND_HOST = re.compile(r"[A-Za-z0-9.:-]{1,253}")


def _bind_host(name: str, raw: str) -> str:
    """An address or host name to listen on (an IPv6 address without brackets)."""
    if not _BIND_HOST.fullmatch(raw):
        raise ConfigError(f"{name}: must be an IP address or a host name, such as 127.0.0.1")
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw)


def _database_url(name: str, raw: str) -> str:
    try:
        parsed = urlparse(raw)
        valid = parsed.scheme in ("postgres", "postgresql") and bool(parsed.hostname or "host=" in parsed.query)
    except ValueError:
        raise ConfigError(f"{name}: is not a valid URL") from None
    if not valid:
        raise ConfigError(f"{name}: must be a postgresql:// URL with a host (postgresql://user:password@host/db)")
    return raw


# --- the table --------------------------------------------------------------------------------


class Section(StrEnum):
    """The groups of env.example and of the README's table, in their order."""

    REQUIRED = "required"
    KEYS = "keys and payouts"
    CHAIN = "chain"
    SERVER = "server"
    UPSTREAM = "upstream"
    PRICING = "pricing"
    LEDGER = "ledger"
    CLAIMS = "claims and admin"


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    `default` is written as an operator would write the value and goes through `parse` like one,
    so the documented default and the one the server uses are the same by construction. Where
    a rule derives the default from other settings, `default` is None and `default_doc` says
    what the rule does, for the README.
    """

    name: str
    field: str  # the Settings field it fills
    parse: Parser[Any]
    section: Section
    help: str
    default: str | None = None
    default_doc: str = ""
    example: str | None = None  # shown uncommented in env.example; otherwise the default, commented out
    secret: bool = False
    aliases: tuple[str, ...] = ()  # other names read when `name` is unset, in this order


_KNOWN_CHAINS = ", ".join(f"{chain_id} = {d.chain_name}" for chain_id, d in DEPLOYMENTS.items())
_KNOWN_RPCS = ", ".join(f"{d.default_rpc_url} for {chain_id}" for chain_id, d in DEPLOYMENTS.items())

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "PROVIDER_PRIVATE_KEY",
        "provider_private_key",
        parse_private_key,
        Section.REQUIRED,
        "The provider's private key, 64 hex digits: channels are opened to its address, and it signs "
        "the claims that collect their earnings. Required, unless PROVIDER_KEYSTORE is set instead.",
        default_doc="required, or PROVIDER_KEYSTORE",
        example="0x...",
        secret=True,
    ),
    Setting(
        "OPENAI_API_KEY",
        "openai_api_key",
        _text,
        Section.REQUIRED,
        "The upstream's API key, sent as a bearer token. Required when the upstream is api.openai.com "
        "(the default); other upstreams may need none.",
        default_doc="required for api.openai.com",
        example="sk-...",
        secret=True,
    ),
    Setting(
        "PROVIDER_KEYSTORE",
        "provider_keystore",
        _path,
        Section.KEYS,
        "An encrypted JSON keystore of the provider's key (`python -m drain_provider keygen` writes one; "
        "geth's and `cast wallet`'s work too), instead of PROVIDER_PRIVATE_KEY: set one of the two. It is "
        "decrypted at start with PROVIDER_KEYSTORE_PASSWORD_FILE. It must be readable by its owner only "
        "(`chmod 600`), or the server does not start.",
        default_doc="none",
    ),
    Setting(
        "PROVIDER_KEYSTORE_PASSWORD_FILE",
        "provider_keystore_password_file",
        _path,
        Section.KEYS,
        "The file whose first line is PROVIDER_KEYSTORE's password; required with it. It must be readable "
        "by its owner only (`chmod 600`), or the server does not start.",
        default_doc="none",
    ),
    Setting(
        "PAYOUT_ADDRESS",
        "payout_address",
        _address,
        Section.KEYS,
        "Where `python -m drain_provider withdraw` sends the USDC the provider's account has been paid "
        "(a wallet you hold elsewhere, ideally not on this server); the gas money stays.",
        default_doc="none: withdraw needs --to",
    ),
    Setting(
        "CHAIN_ID",
        "chain_id",
        _whole(1),
        Section.CHAIN,
        f"The chain of the DrainChannel contract. Known deployments: {_KNOWN_CHAINS}; any other chain "
        "needs RPC_URL and DRAIN_CONTRACT.",
        default="137",
        example="137",
    ),
    Setting(
        "RPC_URL",
        "rpc_url",
        _url,
        Section.CHAIN,
        f"The chain's JSON-RPC endpoint. Default: {_KNOWN_RPCS}; any other chain must set it. It may "
        "carry an API key: no message ever shows more of a URL than its scheme.",
        default_doc="the chain's public RPC",
    ),
    Setting(
        "DRAIN_CONTRACT",
        "drain_contract",
        _address,
        Section.CHAIN,
        "A custom DrainChannel contract to serve instead of the chain's known deployments: a V2 one, "
        "or a V1 one with DRAIN_CONTRACT_VERSION=v1. Any chain without a known deployment must set it.",
        default_doc="the chain's deployments",
    ),
    Setting(
        "DRAIN_CONTRACT_V1",
        "drain_contract_v1",
        _address,
        Section.CHAIN,
        "A custom V1 DrainChannel contract, served beside DRAIN_CONTRACT (unless DRAIN_CONTRACT_VERSION=v2).",
        default_doc="the chain's V1 deployment, unless DRAIN_CONTRACT is set",
    ),
    Setting(
        "DRAIN_CONTRACT_VERSION",
        "contract_version",
        _choice("v1", "v2", "both"),
        Section.CHAIN,
        "Which contracts' channels are served: both (V2, which the MCP server uses, and V1, which the "
        "SDK and the reference provider default to), v2 or v1. The 402 discovery headers announce V2 "
        "when it is served.",
        default="both",
    ),
    Setting(
        "CHAIN_POLL_INTERVAL",
        "chain_poll_interval",
        _seconds(),
        Section.CHAIN,
        "Seconds between reads of the chain's latest block and the contract's ChannelClosed events: a "
        "channel closed on chain is refused within this time, whatever `CLAIM_INTERVAL` is.",
        default="5",
    ),
    Setting(
        "HOST",
        "host",
        _text,
        Section.SERVER,
        "The address to listen on: 0.0.0.0 is every interface, 127.0.0.1 this machine only.",
        default="0.0.0.0",
        example="0.0.0.0",
    ),
    Setting(
        "PORT",
        "port",
        _whole(1, 65535),
        Section.SERVER,
        "The TCP port to listen on.",
        default="3000",
        example="3000",
    ),
    Setting(
        "MAX_CONNECTIONS",
        "max_connections",
        _whole(1, 1_000_000),
        Section.SERVER,
        "The most client connections open at once. One more is closed as soon as it is accepted, so that "
        "a flood of idle or slow connections cannot use up the process's file descriptors; the connections "
        "already open keep working. At start the soft RLIMIT_NOFILE is raised to what this needs, up to "
        "the hard limit.",
        default="1000",
    ),
    Setting(
        "HEADER_TIMEOUT",
        "header_timeout",
        _seconds(),
        Section.SERVER,
        "Seconds a connection has to send a complete request line and headers, and the longest an idle "
        "keep-alive connection is kept open; then it is closed.",
        default="15",
    ),
    Setting(
        "PUBLIC_URL",
        "public_url",
        _url,
        Section.SERVER,
        "The base URL clients reach this server at, such as https://llm.example.com, used in the 402 "
        "discovery headers and `/v1/docs`. Default: the scheme and Host header of each request when "
        "`ALLOWED_HOSTS` names that host, else the address the request came in on.",
        default_doc="each request's Host, if allowed",
    ),
    Setting(
        "ALLOWED_HOSTS",
        "allowed_hosts",
        _hostnames,
        Section.SERVER,
        "Without PUBLIC_URL, the host names (comma-separated, no port) a request's Host header may "
        "name for it to be used in the URLs this server gives out; any other Host is ignored, so that "
        "a forged one is never reflected. By default the loopback names and HOST.",
        default_doc="localhost, 127.0.0.1, ::1 and HOST",
    ),
    Setting(
        "CORS_ORIGINS",
        "cors_origins",
        _origins,
        Section.SERVER,
        "The web origins (comma-separated, like https://app.example.com) whose pages may call the paid and "
        "public endpoints from a browser (CORS: preflights answered, the X-DRAIN and X-Payment headers "
        "readable); `*` for any, `none` for none. Never for `/v1/admin`.",
        default="*",
    ),
    Setting(
        "MAX_BODY_BYTES",
        "max_body_bytes",
        _whole(1024),
        Section.SERVER,
        "The largest request body accepted, in bytes (1048576 = 1 MiB; at least 1024); a larger one gets "
        "413, and one whose Content-Length says it is larger gets it before it is read.",
        default="1048576",
    ),
    Setting(
        "BODY_TIMEOUT",
        "body_timeout",
        _seconds(),
        Section.SERVER,
        "Seconds a client has to send a request's body: a slower one gets 408 request_timeout and the "
        "connection is closed.",
        default="30",
    ),
    Setting(
        "PAYMENT_FAILURES_PER_MINUTE",
        "payment_failures_per_minute",
        _whole(0, 1_000_000),
        Section.SERVER,
        "How many paid requests one client address may have refused (402, or 400, 408, 413 before "
        "payment) per minute, in a burst or spread out; past it, its paid requests get 429 "
        "rate_limited, with Retry-After, until it is under the limit again (one more refusal is "
        "allowed every 60/N seconds). Paid requests that succeed never count. IPv6 addresses count "
        "by /64. 0 turns the limit off (`dev` does).",
        default="60",
    ),
    Setting(
        "TRUSTED_PROXIES",
        "trusted_proxies",
        _networks,
        Section.SERVER,
        "The reverse proxies (addresses or networks, comma-separated; `none` for none) whose "
        "X-Forwarded-For header names the client: from them the client is the rightmost address "
        "that is not a trusted proxy. A proxy on another machine must be listed, or every client "
        "behind it is one client to `PAYMENT_FAILURES_PER_MINUTE`.",
        default="127.0.0.1, ::1",
    ),
    Setting(
        "CLOSE_REQUIRES_SIGNATURE",
        "close_requires_signature",
        _flag,
        Section.SERVER,
        "true: POST /v1/close-channel needs the consumer's signed request (a ConsumerRequest with action "
        '"close" and a recent timestamp), and the MCP server\'s unsigned request is refused with 401. false '
        "(the default): anyone who knows a channel id (they are public on chain) can make this provider "
        "stop serving that channel and sign its final amount; the funds stay safe, since only the "
        "consumer can call cooperativeClose. A signature sent is checked either way.",
        default="false",
    ),
    Setting(
        "LOG_LEVEL",
        "log_level",
        _choice("DEBUG", "INFO", "WARNING", "ERROR"),
        Section.SERVER,
        "DEBUG, INFO, WARNING or ERROR.",
        default="INFO",
    ),
    Setting(
        "LOG_FORMAT",
        "log_format",
        _choice(*LogFormat),
        Section.SERVER,
        "text: `time level=... logger=... event key=value ...` lines; json: one JSON object per line "
        "(`ts`, `level`, `logger`, `event` and each key=value as a key), for log collectors. Both redact "
        "URL secrets.",
        default="text",
    ),
    Setting(
        "METRICS_PORT",
        "metrics_port",
        _whole(1, 65535),
        Section.SERVER,
        "Also serve Prometheus `GET /metrics` on this port, without a token, on `METRICS_HOST`. "
        "Unset: `/metrics` only on the main port, behind `ADMIN_TOKEN`.",
        default_doc="unset",
    ),
    Setting(
        "METRICS_HOST",
        "metrics_host",
        _bind_host,
        Section.SERVER,
        "The address the `METRICS_PORT` listener binds: keep it private (a firewall, or this machine only).",
        default="127.0.0.1",
    ),
    Setting(
        "PAYMENT_MODE",
        "payment_mode",
        _choice(*PaymentMode),
        Section.SERVER,
        "enforce: a request without a valid payment is refused (402). shadow: vouchers are checked and a "
        "valid one is charged, but a request whose payment would be refused is served free and logged "
        "(`payment_refusal_shadowed`), for a rollout. off: nothing is charged, no voucher is read (private "
        "use). shadow and off are loud: a WARNING at start and every 10 minutes, an alert in `/health`.",
        default="enforce",
    ),
    Setting(
        "UPSTREAM_BASE_URL",
        "upstream_base_url",
        _url,
        Section.UPSTREAM,
        "The base URL of any OpenAI-compatible API (OpenAI, OpenRouter, vLLM, Ollama's /v1, ...).",
        default=OPENAI_BASE_URL,
    ),
    Setting(
        "MODELS_FILE",
        "models_file",
        _path,
        Section.UPSTREAM,
        "A routing file (TOML, YAML or JSON, by its extension) naming the upstreams (base URL, the "
        "environment variable holding each one's key) and every model sold: its upstream, its name "
        "there, aliases, prices, per-request prices (images), pass-through markup. When set, it alone "
        "says what is sold: UPSTREAM_BASE_URL and PRICING_FILE must be unset, and the `PRICE_<MODEL>_*` "
        'variables still override its per-token prices. See the README, "Models and upstreams".',
        default_doc="none: UPSTREAM_BASE_URL, OPENAI_API_KEY and the prices below",
    ),
    Setting(
        "UPSTREAM_TIMEOUT",
        "upstream_timeout",
        _seconds(),
        Section.UPSTREAM,
        "Seconds before an upstream call is abandoned: the client gets 504 and is not charged.",
        default="300",
    ),
    Setting(
        "MAX_ANSWER_BYTES",
        "max_answer_bytes",
        _whole(1024),
        Section.UPSTREAM,
        "The most bytes read from the upstream for one answer (8388608 = 8 MiB; at least 1024), so that "
        "no upstream can make the server hold an answer of any size. A larger JSON answer is not read "
        "past it: the client gets 502 upstream_error and is not charged. A stream stops there, with an "
        "SSE error event, and is charged what was delivered; one SSE event may not be larger either.",
        default="8388608",
    ),
    Setting(
        "PRICING_FILE",
        "prices",
        _path,
        Section.PRICING,
        'A JSON file adding or replacing models, such as `{"llama-3.1-70b": {"input": 900, "output": 900}}`. '
        "The `PRICE_<MODEL>_*` variables apply on top of it.",
        default_doc="none",
    ),
    Setting(
        "DEFAULT_MAX_TOKENS",
        "default_max_tokens",
        _whole(1, 10_000_000),
        Section.PRICING,
        "Output tokens reserved for a request that sets no max_tokens: the upstream call is capped to "
        "this, or to what the voucher pays for, whichever is less.",
        default="4096",
    ),
    Setting(
        "MIN_OUTPUT_TOKENS",
        "min_output_tokens",
        _whole(1, 10_000_000),
        Section.PRICING,
        "A voucher must leave room for the input plus at least this many output tokens; otherwise the "
        "request gets 402 insufficient_funds.",
        default="16",
    ),
    Setting(
        "DATABASE_PATH",
        "database_path",
        _path,
        Section.LEDGER,
        "The SQLite ledger of channels, vouchers, usage and claims; its directory is created if missing.",
        default="data/drain.db",
        aliases=("STORAGE_PATH",),
    ),
    Setting(
        "DATABASE_URL",
        "database_url",
        _database_url,
        Section.LEDGER,
        "A PostgreSQL ledger instead of the SQLite file (`postgresql://user:password@host:5432/db`): "
        "several provider instances can then share it behind a load balancer, one of them claiming. "
        "DATABASE_PATH and LEDGER_SYNC are not used.",
        default_doc="unset: the SQLite file",
        secret=True,
    ),
    Setting(
        "INSTANCE_TIMEOUT",
        "instance_timeout",
        _seconds(),
        Section.LEDGER,
        "With `DATABASE_URL`: an instance silent this long is dead, and the others release what its "
        "requests in flight held (they are not charged). Each instance beats every third of it.",
        default="30",
    ),
    Setting(
        "LEDGER_SYNC",
        "ledger_sync",
        _choice(*SyncMode),
        Section.LEDGER,
        "FULL: every accepted voucher is fsync'd before the upstream is called, so it survives a power "
        "cut. NORMAL: it survives a crash of the process, but the last commits may not survive a power "
        "cut; saves an fsync per commit (commits are grouped under load either way).",
        default="FULL",
    ),
    Setting(
        "CLAIM_THRESHOLD",
        "claim_threshold",
        _whole(),
        Section.CLAIMS,
        "The claimer runs inside the server and claims a channel once its unclaimed earnings reach this "
        "amount (10000000 = 10 USDC), and once more at the end, after the `MIN_CHANNEL_TTL` cut-off, for "
        "whatever is left.",
        default="10000000",
        example="10000000",
    ),
    Setting(
        "CLAIM_INTERVAL",
        "claim_interval",
        _seconds(allow_zero=True),
        Section.CLAIMS,
        "Seconds between claim cycles. 0 turns automatic claims off: claim with "
        "`python -m drain_provider claim` or `POST /v1/admin/claim` instead.",
        default="60",
    ),
    Setting(
        "CLAIM_RETRY_SECONDS",
        "claim_retry_seconds",
        _seconds(),
        Section.CLAIMS,
        "Seconds before the first retry of a failed claim; the delay doubles after each failure, up to an hour.",
        default="30",
    ),
    Setting(
        "MAX_FEE_GWEI",
        "max_fee_per_gas",
        _gwei,
        Section.CLAIMS,
        "The fee ceiling, in gwei per gas: a claim waits rather than pay more.",
        default="1000",
    ),
    Setting(
        "LOW_GAS_CLAIMS",
        "low_gas_claims",
        _whole(0, 1_000_000),
        Section.CLAIMS,
        "Warn (a WARNING log line and the low_gas alert of /health) when the provider's gas balance "
        "pays for fewer claims than this, at the chain's current fees; 0 turns the warning off. Below "
        "one claim's worth the alert is insufficient_gas_funds whatever this is.",
        default="10",
    ),
    Setting(
        "MIN_CHANNEL_TTL",
        "min_channel_ttl",
        _whole(0, _YEAR),
        Section.CLAIMS,
        "Vouchers for a channel that expires (in chain time) within this many seconds are refused with "
        "402 channel_expiring, so that there is always time to claim what they pay for: the channel's final "
        "claim is made in this window. Channels must be opened for longer than this.",
        default="600",
    ),
    Setting(
        "GAS_TOKEN_PRICE",
        "gas_token_price",
        _usdc,
        Section.CLAIMS,
        "The price of one gas token (POL) in USDC, as a decimal. Used only to hold back a threshold claim "
        "whose gas would cost more than it brings (a channel's final claim is always made). The default "
        "overestimates POL, so it holds back only claims that are surely not worth it.",
        default="1",
    ),
    Setting(
        "ADMIN_TOKEN",
        "admin_token",
        _admin_token,
        Section.CLAIMS,
        "The bearer token for `/v1/admin/*`, at least 16 characters (try `openssl rand -hex 32`). "
        "Without it the admin API answers 403.",
        default_doc="none: the admin API is off",
        secret=True,
    ),
)

# Not a table entry: the names depend on the models priced.
PRICE_PATTERN = ("PRICE_<MODEL>_INPUT", "PRICE_<MODEL>_OUTPUT")
_EXAMPLE_MODEL = "gpt-4o"
PRICE_PATTERN_HELP = (
    "Prices are USDC base units per 1,000 tokens. Defaults: "
    + ", ".join(f"{model} {p.input_per_1k}/{p.output_per_1k}" for model, p in DEFAULT_PRICES.items())
    + ". `PRICE_<MODEL>_INPUT` and `PRICE_<MODEL>_OUTPUT` override one side of a model's price, the "
    'model name upper-cased with every non-alphanumeric as "_" (PRICE_GPT_4O_INPUT); the spelling '
    "without them (PRICE_GPT4O_INPUT) works too."
)


# --- loading ----------------------------------------------------------------------------------


def _read(setting: Setting, env: Mapping[str, str]) -> Any:
    """An empty or blank value counts as unset, so that `PORT=` in .env means the default."""
    for name in (setting.name, *setting.aliases):
        raw = env.get(name, "").strip()
        if raw:
            return setting.parse(name, raw)
    return None if setting.default is None else setting.parse(setting.name, setting.default)


def _contracts(custom: str | None, custom_v1: str | None, chain_id: int, version: str) -> tuple[ContractRef, ...]:
    """The contracts served, the primary (V2 when served) first. A custom DRAIN_CONTRACT
    replaces the chain's deployments; DRAIN_CONTRACT_V1 names a custom V1 beside it."""
    deployment = DEPLOYMENTS.get(chain_id)
    v2 = custom if custom is not None else (deployment.v2 if deployment else None)
    if version == "v1":
        v1 = custom_v1 or custom or (deployment.v1 if deployment else None)
    else:
        v1 = custom_v1 or (deployment.v1 if deployment and custom is None else None)
    wanted = {"v1": [("v1", v1)], "v2": [("v2", v2)], "both": [("v2", v2), ("v1", v1)]}[version]
    refs = tuple(ContractRef(address, name) for name, address in wanted if address is not None)
    if not refs:
        known = ", ".join(map(str, DEPLOYMENTS))
        raise ConfigError(f"DRAIN_CONTRACT: not set, and chain {chain_id} has no known deployment ({known})")
    return refs


def _rpc_url(explicit: str | None, chain_id: int) -> str:
    if explicit is not None:
        return explicit
    deployment = DEPLOYMENTS.get(chain_id)
    if deployment is None:
        raise ConfigError(f"RPC_URL: not set, and chain {chain_id} has no default public RPC")
    return deployment.default_rpc_url


def _require_openai_key(api_key: str | None, upstream: str) -> None:
    """Other upstreams (a local vLLM, Ollama) may take no key; OpenAI always wants one, and
    failing here beats a 401 on every paid request."""
    if api_key is None and urlparse(upstream).hostname == "api.openai.com":
        raise ConfigError("OPENAI_API_KEY: not set (needed for the upstream api.openai.com)")


def _prices(pricing_file: Path | None, env: Mapping[str, str]) -> dict[str, ModelPrice]:
    """The defaults, then the file, then the PRICE_ variables: each layer overrides the last."""
    prices = dict(DEFAULT_PRICES)
    try:
        if pricing_file is not None:
            prices.update(load_pricing_file(pricing_file))
        return apply_env_overrides(prices, env)
    except PricingError as exc:
        raise ConfigError(str(exc)) from None


def load_prices(env: Mapping[str, str]) -> dict[str, ModelPrice]:
    """`PRICING_FILE` and the `PRICE_` variables alone, as `load_settings` reads them: what a
    running server reloads on SIGHUP. A ConfigError names what is wrong."""
    (pricing_file,) = (setting for setting in SETTINGS if setting.field == "prices")
    return _prices(_read(pricing_file, env), env)


def _file_catalog(path: Path, env: Mapping[str, str]) -> Catalog:
    """MODELS_FILE's catalog, the `PRICE_` variables applied to its per-token prices. The settings
    it replaces must be unset: one of them set and silently unused would mislead the operator."""
    for name in ("UPSTREAM_BASE_URL", "PRICING_FILE"):
        if env.get(name, "").strip():
            raise ConfigError(f"{name}: not used with MODELS_FILE (the models file says it): unset it")
    try:
        catalog = read_catalog(path, env)
        routes = {name: route for name, route in catalog.routes.items() if route.kind is not Kind.IMAGES}
        priced = apply_env_overrides({name: route.price for name, route in routes.items()}, env)
    except (CatalogError, PricingError) as exc:
        raise ConfigError(str(exc)) from None
    changed = {}
    for name, route in routes.items():
        price = priced[name]
        if route.kind is Kind.EMBEDDINGS:
            price = ModelPrice(price.input_per_1k, 0)  # input only: PRICE_<MODEL>_OUTPUT means nothing here
        if price != route.price:
            changed[name] = replace(route, price=price)
    return replace(catalog, routes={**catalog.routes, **changed}) if changed else catalog


def load_catalog(env: Mapping[str, str], settings: Settings) -> Catalog:
    """What SIGHUP reloads: MODELS_FILE's catalog, or without it the catalog of `settings`'
    upstream at the prices of `PRICING_FILE` and the `PRICE_` variables. A ConfigError names what is wrong."""
    (models_file,) = (setting for setting in SETTINGS if setting.field == "models_file")
    path = _read(models_file, env)
    if path is not None:
        return _file_catalog(path, env)
    return derived_catalog(load_prices(env), settings.upstream_base_url, settings.openai_api_key)


def read_setting(name: str, env: Mapping[str, str]) -> Any:
    """One setting alone, parsed as `load_settings` would, for a command that needs no more
    (`usage` reads only DATABASE_PATH)."""
    return _read(next(setting for setting in SETTINGS if setting.name == name), env)


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate everything up front: a provider that starts is a provider whose settings work."""
    # Any: each entry's parser gives its field's type; the table tests pin that they match.
    values: dict[str, Any] = {setting.field: _read(setting, env) for setting in SETTINGS}
    values["provider_private_key"] = _provider_key(
        values["provider_private_key"], values["provider_keystore"], values["provider_keystore_password_file"]
    )
    contracts = _contracts(
        values["drain_contract"], values["drain_contract_v1"], values["chain_id"], values["contract_version"]
    )
    values.update(contracts=contracts, drain_contract=contracts[0].address, contract_version=contracts[0].version)
    values["rpc_url"] = _rpc_url(values["rpc_url"], values["chain_id"])
    if values["models_file"] is not None:
        catalog = _file_catalog(values["models_file"], env)
        values.update(routing=catalog, prices=catalog.prices)
    else:
        _require_openai_key(values["openai_api_key"], values["upstream_base_url"])
        values["prices"] = _prices(values["prices"], env)
    _require_final_claim_window(values["claim_interval"], values["min_channel_ttl"])
    return Settings(**values)


def _provider_key(raw_key: bytes | None, keystore: Path | None, password_file: Path | None) -> bytes:
    """The key, from PROVIDER_PRIVATE_KEY or decrypted from PROVIDER_KEYSTORE: exactly one of the
    two ways, so that no one wonders which key a provider signs with."""
    if raw_key is not None and keystore is not None:
        raise ConfigError("PROVIDER_KEYSTORE: set, and so is PROVIDER_PRIVATE_KEY: keep one of the two")
    if keystore is None:
        if password_file is not None:
            raise ConfigError("PROVIDER_KEYSTORE_PASSWORD_FILE: set without PROVIDER_KEYSTORE, which it opens")
        if raw_key is None:
            raise ConfigError(
                "PROVIDER_PRIVATE_KEY: not set, and a key is required: set it, or PROVIDER_KEYSTORE and "
                "PROVIDER_KEYSTORE_PASSWORD_FILE (`python -m drain_provider keygen` makes them; see env.example)"
            )
        return raw_key
    if password_file is None:
        raise ConfigError("PROVIDER_KEYSTORE_PASSWORD_FILE: not set, and PROVIDER_KEYSTORE needs its password")
    try:
        return decrypt_keystore(
            keystore,
            password_file,
            keystore_name="PROVIDER_KEYSTORE",
            password_name="PROVIDER_KEYSTORE_PASSWORD_FILE",
        )
    except KeystoreError as exc:
        raise ConfigError(str(exc)) from None


def database_path(env: Mapping[str, str]) -> Path:
    """DATABASE_PATH alone, as `load_settings` reads it: what `backup` needs (no key, no chain)."""
    (setting,) = (setting for setting in SETTINGS if setting.field == "database_path")
    return Path(_read(setting, env))


def _require_final_claim_window(claim_interval: float, min_channel_ttl: int) -> None:
    """A channel's final claim is made between its MIN_CHANNEL_TTL cut-off and its expiry: the
    claimer must look at least twice in that window."""
    if claim_interval > 0 and claim_interval * 2 > min_channel_ttl:
        raise ConfigError(
            f"CLAIM_INTERVAL: must be at most half of MIN_CHANNEL_TTL ({min_channel_ttl} s), so that each "
            "channel's final claim falls between the voucher cut-off and expiry"
        )


# --- documentation ----------------------------------------------------------------------------

_ENV_HEADER = """\
# drain-provider settings. Copy to .env and edit: `cp env.example .env`.
# Real environment variables win over .env, and an empty value counts as unset. Every value is
# checked at start-up; a bad one stops the server with one line naming it (exit code 2).
# Amounts are USDC base units: 1 USDC = 1000000.
# Generated from drain_provider/config.py by: python -m drain_provider.devtools.settings_docs
"""
_WIDTH = 95
_RULE_WIDTH = 91
_NBSP = "\u00a0"  # textwrap breaks at ASCII whitespace only


def _describe(setting: Setting) -> str:
    """The help plus what the flags imply, worded once for both env.example and the README."""
    text = setting.help
    if setting.aliases:
        text += f" When it is unset, {' then '.join(setting.aliases)} is read instead."
    if setting.secret:
        text += " Keep it secret: it is never logged or shown."
    return text


def _comment(text: str) -> list[str]:
    """Wrapped as comment lines, never inside a `code span`: a command cut in two is hard to copy."""
    glued = re.sub(r"`[^`]*`", lambda span: span[0].replace(" ", _NBSP), text)
    wrapped = textwrap.wrap(glued, _WIDTH, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)
    return [line.replace(_NBSP, " ") for line in wrapped]


def _price_example_lines() -> list[str]:
    """The reference provider's spelling (PRICE_GPT4O_INPUT) of the defaults, so the file shows the pattern."""
    price = DEFAULT_PRICES[_EXAMPLE_MODEL]
    stem = env_names(_EXAMPLE_MODEL)[-1]
    return [f"PRICE_{stem}_INPUT={price.input_per_1k}", f"PRICE_{stem}_OUTPUT={price.output_per_1k}"]


def _env_lines(setting: Setting) -> list[str]:
    """Commented out unless there is an example, so that copying the file changes nothing but
    what the operator must (or is most likely to) set."""
    if setting.example is not None:
        assignment = f"{setting.name}={setting.example}"
    else:
        assignment = f"# {setting.name}={setting.default or ''}"
    return [*_comment(_describe(setting)), assignment]


def render_env_example() -> str:
    """The text of env.example; a test keeps the committed file equal to it."""
    lines = [_ENV_HEADER.rstrip("\n")]
    for section in Section:
        lines += ["", f"# --- {section} ".ljust(_RULE_WIDTH, "-")]
        if section is Section.PRICING:
            lines += _comment(PRICE_PATTERN_HELP) + _price_example_lines()
        for setting in SETTINGS:
            if setting.section is section:
                lines += _env_lines(setting)
    return "\n".join(lines) + "\n"


def _markdown_default(setting: Setting) -> str:
    if setting.default is not None:
        return f"`{setting.default}`"
    return setting.default_doc


def _markdown_row(variables: str, default: str, text: str) -> str:
    """A `|` would end the cell, even inside a code span; GitHub's tables take it escaped."""
    cell = text.replace("|", "\\|")
    return f"| {variables} | {default} | {cell} |"


def render_settings_markdown() -> str:
    """The README's settings table: every variable, its default and what it does."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for section in Section:
        if section is Section.PRICING:
            names = ", ".join(f"`{name}`" for name in PRICE_PATTERN)
            rows.append(_markdown_row(names, "the model's default price", PRICE_PATTERN_HELP))
        for setting in SETTINGS:
            if setting.section is section:
                names = ", ".join(f"`{name}`" for name in (setting.name, *setting.aliases))
                rows.append(_markdown_row(names, _markdown_default(setting), _describe(setting)))
    return "\n".join(rows) + "\n"
