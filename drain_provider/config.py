"""Settings from the environment and `.env`.

One function, `load_settings`, turns a mapping of strings into a typed, validated `Settings`.
Every problem is a `ConfigError` whose message names the variable and what is wrong, so the CLI
can print one line and exit 2. Secret values are never part of a message or a repr.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dotenv import dotenv_values
from eth_keys.datatypes import PrivateKey
from eth_utils.address import is_hex_address, to_checksum_address

from .pricing import DEFAULT_PRICES, ModelPrice, PricingError, apply_env_overrides, load_pricing_file
from .protocol import DEPLOYMENTS, SECP256K1_N

OPENAI_BASE_URL = "https://api.openai.com/v1"


class ConfigError(Exception):
    """A setting is missing or wrong. str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Settings:
    provider_private_key: bytes = field(repr=False)
    chain_id: int
    drain_contract: str
    contract_version: str
    rpc_url: str | None  # None: the embedded chain of `dev` and the tests
    host: str = "0.0.0.0"
    port: int = 3000
    public_url: str | None = None
    upstream_base_url: str = OPENAI_BASE_URL
    openai_api_key: str | None = field(default=None, repr=False)
    upstream_timeout: float = 300.0
    database_path: Path = Path("data/drain.db")
    ledger_sync: str = "FULL"
    prices: Mapping[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    claim_threshold: int = 10_000_000
    claim_interval: float = 60.0
    claim_expiry_margin: int = 3600
    claim_retry_seconds: float = 30.0  # first backoff after a failed claim; doubles up to an hour
    claim_receipt_timeout: float = 180.0
    max_fee_per_gas: int = 1000 * 10**9  # wei; a claim waits rather than pay more
    min_channel_ttl: int = 600
    admin_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = 1024 * 1024
    default_max_tokens: int = 4096
    min_output_tokens: int = 16
    log_level: str = "INFO"

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


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0, maximum: int = 2**63 - 1) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise ConfigError(f"{name}: must be a whole number, got {raw[:40]!r}")
    if len(raw) > 19:
        raise ConfigError(f"{name}: must be between {minimum} and {maximum}")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}: must be between {minimum} and {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: must be a number of seconds, got {raw[:40]!r}") from None
    if not (0 < value < 86400 or (allow_zero and value == 0)):
        raise ConfigError(f"{name}: must be between 0 and 86400 seconds, got {raw[:40]!r}")
    return value


def _url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        parsed = urlparse(raw)
        valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:  # e.g. "http://[abc": an unclosed IPv6 bracket
        raise ConfigError(f"{name}: is not a valid URL") from None
    if not valid:
        # The URL may carry an API key in its path or query; show only its scheme.
        raise ConfigError(f"{name}: must be an http:// or https:// URL (got scheme {parsed.scheme or 'none'!r})")
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
        raise ConfigError(f"{name}: must be a 0x-prefixed 20-byte address, got {raw[:60]!r}")
    return str(to_checksum_address(raw))


def load_settings(env: Mapping[str, str]) -> Settings:
    """Validate everything up front: a provider that starts is a provider whose settings work."""
    key_raw = _get(env, "PROVIDER_PRIVATE_KEY")
    if key_raw is None:
        raise ConfigError("PROVIDER_PRIVATE_KEY: not set (the key of the address channels are opened to)")
    private_key = parse_private_key("PROVIDER_PRIVATE_KEY", key_raw)

    chain_id = _int(env, "CHAIN_ID", 137, minimum=1)
    version = (_get(env, "DRAIN_CONTRACT_VERSION") or "v2").lower()
    if version not in ("v1", "v2"):
        raise ConfigError(f"DRAIN_CONTRACT_VERSION: must be v1 or v2, got {version!r}")
    deployment = DEPLOYMENTS.get(chain_id)

    contract_raw = _get(env, "DRAIN_CONTRACT")
    if contract_raw is not None:
        contract = _address("DRAIN_CONTRACT", contract_raw)
    elif deployment is not None:
        contract = deployment.v2 if version == "v2" else deployment.v1
    else:
        raise ConfigError(f"DRAIN_CONTRACT: not set, and chain {chain_id} has no known deployment (137, 80002)")

    rpc_url = _url(env, "RPC_URL", deployment.default_rpc_url if deployment else None)
    if rpc_url is None:
        raise ConfigError(f"RPC_URL: not set, and chain {chain_id} has no default public RPC")

    upstream = _url(env, "UPSTREAM_BASE_URL", OPENAI_BASE_URL)
    assert upstream is not None
    api_key = _get(env, "OPENAI_API_KEY")
    if api_key is None and urlparse(upstream).hostname == "api.openai.com":
        raise ConfigError("OPENAI_API_KEY: not set (needed for the default upstream api.openai.com)")

    prices: dict[str, ModelPrice] = dict(DEFAULT_PRICES)
    try:
        pricing_file = _get(env, "PRICING_FILE")
        if pricing_file is not None:
            prices.update(load_pricing_file(Path(pricing_file)))
        prices = apply_env_overrides(prices, env)
    except PricingError as exc:
        raise ConfigError(str(exc)) from None

    database = _get(env, "DATABASE_PATH") or _get(env, "STORAGE_PATH") or "data/drain.db"
    ledger_sync = (_get(env, "LEDGER_SYNC") or "FULL").upper()
    if ledger_sync not in ("FULL", "NORMAL"):
        raise ConfigError(f"LEDGER_SYNC: must be FULL or NORMAL, got {ledger_sync[:20]!r}")
    log_level = (_get(env, "LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    admin_token = _get(env, "ADMIN_TOKEN")
    if admin_token is not None and len(admin_token) < 16:
        raise ConfigError("ADMIN_TOKEN: must be at least 16 characters (try: openssl rand -hex 32)")

    return Settings(
        provider_private_key=private_key,
        chain_id=chain_id,
        drain_contract=contract,
        contract_version=version,
        rpc_url=rpc_url,
        host=_get(env, "HOST") or "0.0.0.0",
        port=_int(env, "PORT", 3000, minimum=1, maximum=65535),
        public_url=_url(env, "PUBLIC_URL", None),
        upstream_base_url=upstream,
        openai_api_key=api_key,
        upstream_timeout=_float(env, "UPSTREAM_TIMEOUT", 300.0),
        database_path=Path(database),
        ledger_sync=ledger_sync,
        prices=prices,
        claim_threshold=_int(env, "CLAIM_THRESHOLD", 10_000_000),
        claim_interval=_float(env, "CLAIM_INTERVAL", 60.0, allow_zero=True),
        claim_expiry_margin=_int(env, "CLAIM_EXPIRY_MARGIN", 3600, maximum=365 * 86400),
        claim_retry_seconds=_float(env, "CLAIM_RETRY_SECONDS", 30.0),
        max_fee_per_gas=_int(env, "MAX_FEE_GWEI", 1000, minimum=1, maximum=10**9) * 10**9,
        min_channel_ttl=_int(env, "MIN_CHANNEL_TTL", 600, maximum=365 * 86400),
        admin_token=admin_token,
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 1024 * 1024, minimum=1024),
        default_max_tokens=_int(env, "DEFAULT_MAX_TOKENS", 4096, minimum=1, maximum=10_000_000),
        min_output_tokens=_int(env, "MIN_OUTPUT_TOKENS", 16, minimum=1, maximum=10_000_000),
        log_level=log_level,
    )
