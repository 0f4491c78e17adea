"""Pins `drain_provider.config` and the CLI's handling of bad configuration.

- `load_settings` defaults (Polygon V2, port 3000, claim threshold 10 USDC) and deployment choice
  by `CHAIN_ID` / `DRAIN_CONTRACT_VERSION`.
- Every bad value is a `ConfigError` whose message names the variable; secrets (private key,
  OpenAI key, admin token) are in no message and not in `repr(settings)`.
- The table (`SETTINGS`): its defaults are the `Settings` defaults, an alias is read when the
  name is unset, LEDGER_SYNC gives a `SyncMode`, and no message quotes the value it refuses.
- `python -m drain_provider` with a bad configuration exits 2 with exactly one stderr line, no
  traceback and no secret; it reads `.env` from the working directory, and the real environment
  wins over `.env`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account

from drain_provider.config import SETTINGS, ConfigError, Settings, load_settings, read_environment
from drain_provider.protocol import DEPLOYMENTS, SECP256K1_N, ContractRef
from drain_provider.states import SyncMode

KEY_HEX = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
OPENAI_KEY = "sk-test-Zq9VfXw3secretOpenAIkey"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
BASE = {"PROVIDER_PRIVATE_KEY": "0x" + KEY_HEX, "OPENAI_API_KEY": OPENAI_KEY}


def settings(**env: str) -> Settings:
    return load_settings({**BASE, **env})


def config_error(env: dict[str, str]) -> str:
    """The message of the ConfigError that `env` must cause."""
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    return str(info.value)


# --- defaults and deployments ----------------------------------------------------------------


def test_defaults_with_only_the_required_variables() -> None:
    s = settings()
    assert (s.chain_id, s.port, s.claim_threshold) == (137, 3000, 10_000_000)
    assert s.drain_contract == DEPLOYMENTS[137].v2
    assert s.contract_version == "v2"
    assert s.rpc_url == DEPLOYMENTS[137].default_rpc_url
    assert s.upstream_base_url == "https://api.openai.com/v1"
    assert s.provider_private_key == bytes.fromhex(KEY_HEX)
    assert s.provider_address == Account.from_key(bytes.fromhex(KEY_HEX)).address


def test_amoy_uses_its_v2_deployment() -> None:
    s = settings(CHAIN_ID="80002")
    assert s.drain_contract == DEPLOYMENTS[80002].v2
    assert s.rpc_url == DEPLOYMENTS[80002].default_rpc_url


@pytest.mark.parametrize("version", ["v1", "V1"])
def test_contract_version_v1(version: str) -> None:
    assert settings(DRAIN_CONTRACT_VERSION=version).drain_contract == DEPLOYMENTS[137].v1


def test_both_deployments_are_served_by_default_v2_first() -> None:
    d = DEPLOYMENTS[80002]
    assert settings(CHAIN_ID="80002").contracts == (ContractRef(d.v2, "v2"), ContractRef(d.v1, "v1"))
    assert settings(CHAIN_ID="80002", DRAIN_CONTRACT_VERSION="v2").contracts == (ContractRef(d.v2, "v2"),)
    assert settings(CHAIN_ID="80002", DRAIN_CONTRACT_VERSION="v1").contracts == (ContractRef(d.v1, "v1"),)


def test_custom_contracts() -> None:
    v2, v1 = "0x" + "12" * 20, "0x" + "34" * 20
    custom = {"CHAIN_ID": "31337", "RPC_URL": "http://127.0.0.1:8545/"}
    # A custom DRAIN_CONTRACT alone is a V2 one, served alone, on any chain.
    assert [c.version for c in settings(**custom, DRAIN_CONTRACT=v2).contracts] == ["v2"]
    assert [c.version for c in settings(DRAIN_CONTRACT=v2).contracts] == ["v2"]
    both = settings(**custom, DRAIN_CONTRACT=v2, DRAIN_CONTRACT_V1=v1)
    assert [(c.address.lower(), c.version) for c in both.contracts] == [(v2, "v2"), (v1, "v1")]
    assert (both.drain_contract.lower(), both.contract_version) == (v2, "v2")
    only_v1 = settings(**custom, DRAIN_CONTRACT=v1, DRAIN_CONTRACT_VERSION="v1")
    assert [(c.address.lower(), c.version) for c in only_v1.contracts] == [(v1, "v1")]
    assert only_v1.contract_version == "v1"


def test_explicit_contract_is_checksummed() -> None:
    assert settings(DRAIN_CONTRACT=DEPLOYMENTS[137].v1.lower()).drain_contract == DEPLOYMENTS[137].v1


def test_unknown_chain_needs_contract() -> None:
    assert "DRAIN_CONTRACT" in config_error({**BASE, "CHAIN_ID": "31337"})


def test_unknown_chain_needs_rpc_url() -> None:
    message = config_error({**BASE, "CHAIN_ID": "31337", "DRAIN_CONTRACT": "0x" + "12" * 20})
    assert message.startswith("RPC_URL")


def test_unknown_chain_with_contract_and_rpc_url() -> None:
    s = settings(CHAIN_ID="31337", DRAIN_CONTRACT="0x" + "12" * 20, RPC_URL="http://127.0.0.1:8545/")
    assert (s.chain_id, s.rpc_url) == (31337, "http://127.0.0.1:8545")


def test_private_key_without_prefix() -> None:
    assert settings(PROVIDER_PRIVATE_KEY=KEY_HEX.upper()).provider_private_key == bytes.fromhex(KEY_HEX)


def test_openai_key_not_needed_for_other_upstreams() -> None:
    s = load_settings({"PROVIDER_PRIVATE_KEY": KEY_HEX, "UPSTREAM_BASE_URL": "http://localhost:8000/v1"})
    assert s.openai_api_key is None
    assert s.upstream_base_url == "http://localhost:8000/v1"


def test_empty_values_mean_unset() -> None:
    assert settings(PORT="", CHAIN_ID="  ", LOG_LEVEL="").port == 3000


def test_price_override_reaches_settings() -> None:
    assert settings(PRICE_GPT4O_INPUT="100").prices["gpt-4o"].input_per_1k == 100


def test_table_defaults_are_the_settings_defaults() -> None:
    """What the server runs with when nothing is set is what code building `Settings` directly
    (the tests, `dev`) gets: the table's defaults and the dataclass's cannot drift apart."""
    d = DEPLOYMENTS[137]
    expected = Settings(
        provider_private_key=bytes.fromhex(KEY_HEX),
        chain_id=137,
        drain_contract=d.v2,
        contract_version="v2",
        rpc_url=d.default_rpc_url,
        openai_api_key=OPENAI_KEY,
        contracts=(ContractRef(d.v2, "v2"), ContractRef(d.v1, "v1")),
    )
    assert settings() == expected


def test_proxies_and_hosts() -> None:
    s = settings(
        TRUSTED_PROXIES="10.0.0.0/8, 192.168.1.7,2001:db8::/32", ALLOWED_HOSTS="API.example.com, [::1], 10.1.2.3"
    )
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"]
    assert s.allowed_hosts == ("api.example.com", "::1", "10.1.2.3")
    assert settings(TRUSTED_PROXIES="none").trusted_proxies == ()
    default = settings()
    assert [str(n) for n in default.trusted_proxies] == ["127.0.0.1/32", "::1/128"] and default.allowed_hosts is None
    assert (default.payment_failures_per_minute, default.body_timeout) == (60, 30.0)


def test_values_are_stripped() -> None:
    s = settings(HOST=" 127.0.0.1 ", PORT=" 8080\n", LOG_LEVEL=" debug ")
    assert (s.host, s.port, s.log_level) == ("127.0.0.1", 8080, "DEBUG")


@pytest.mark.parametrize(
    ("raw", "mode"), [("FULL", SyncMode.FULL), ("normal", SyncMode.NORMAL), ("Normal", SyncMode.NORMAL)]
)
def test_ledger_sync_is_case_insensitive(raw: str, mode: SyncMode) -> None:
    value = settings(LEDGER_SYNC=raw).ledger_sync
    assert value == mode and type(value) is SyncMode


def test_ledger_sync_default() -> None:
    assert settings().ledger_sync is SyncMode.FULL


def test_max_fee_is_read_in_gwei_and_kept_in_wei() -> None:
    assert settings(MAX_FEE_GWEI="30").max_fee_per_gas == 30 * 10**9


def test_low_gas_claims() -> None:
    assert (settings().low_gas_claims, settings(LOW_GAS_CLAIMS="0").low_gas_claims) == (10, 0)


def test_claim_interval_zero_turns_claims_off() -> None:
    assert settings(CLAIM_INTERVAL="0").claim_interval == 0


@pytest.mark.parametrize(
    ("raw", "value"), [("true", True), ("1", True), ("Yes", True), ("false", False), ("OFF", False)]
)
def test_close_requires_signature_is_a_flag(raw: str, value: bool) -> None:
    assert settings().close_requires_signature is False
    assert settings(CLOSE_REQUIRES_SIGNATURE=raw).close_requires_signature is value


def test_storage_path_is_an_alias_of_database_path() -> None:
    assert settings(STORAGE_PATH="/srv/ledger.db").database_path == Path("/srv/ledger.db")
    assert settings(STORAGE_PATH="/srv/b.db", DATABASE_PATH="/srv/a.db").database_path == Path("/srv/a.db")
    assert settings(STORAGE_PATH="/srv/b.db", DATABASE_PATH="  ").database_path == Path("/srv/b.db")


# --- bad values ------------------------------------------------------------------------------

BAD_VALUES = [
    ("PORT", "abc"),
    ("PORT", "70000"),
    ("PORT", "0"),
    ("PORT", "-1"),
    ("CHAIN_ID", "-1"),
    ("CHAIN_ID", "0"),
    ("CHAIN_ID", "0x89"),
    ("CLAIM_THRESHOLD", "1.5"),
    ("CLAIM_THRESHOLD", "1e7"),
    ("RPC_URL", "ftp://x"),
    ("RPC_URL", "polygon-rpc.com"),
    ("UPSTREAM_BASE_URL", "not-a-url"),
    ("PUBLIC_URL", "localhost:3000"),
    ("DRAIN_CONTRACT", "0x123"),
    ("DRAIN_CONTRACT", "0x" + "zz" * 20),
    ("DRAIN_CONTRACT_VERSION", "v3"),
    ("LOG_LEVEL", "LOUD"),
    ("ADMIN_TOKEN", "short"),
    ("UPSTREAM_TIMEOUT", "abc"),
    ("UPSTREAM_TIMEOUT", "0"),
    ("UPSTREAM_TIMEOUT", "nan"),
    ("MAX_BODY_BYTES", "10"),
    ("PRICE_GPT_4O_OUTPUT", "1.5"),
    ("LEDGER_SYNC", "OFF"),
    ("MAX_FEE_GWEI", "0"),
    ("MAX_FEE_GWEI", "1000000001"),
    ("CLAIM_RETRY_SECONDS", "0"),
    ("CLAIM_INTERVAL", "-1"),
    ("CLAIM_INTERVAL", "86400"),
    ("CHAIN_POLL_INTERVAL", "0"),
    ("GAS_TOKEN_PRICE", "0.0000001"),
    ("MIN_CHANNEL_TTL", "1e3"),
    ("DEFAULT_MAX_TOKENS", "0"),
    ("MIN_OUTPUT_TOKENS", "10000001"),
    ("BODY_TIMEOUT", "0"),
    ("PAYMENT_FAILURES_PER_MINUTE", "-1"),
    ("PAYMENT_FAILURES_PER_MINUTE", "1000001"),
    ("TRUSTED_PROXIES", "10.0.0.0/33"),
    ("TRUSTED_PROXIES", "proxy.example.com"),
    ("ALLOWED_HOSTS", "https://api.example.com"),
    ("ALLOWED_HOSTS", "api.example.com:443"),
    ("ALLOWED_HOSTS", "bad host"),
    ("LOW_GAS_CLAIMS", "-1"),
    ("LOW_GAS_CLAIMS", "ten"),
    ("CLOSE_REQUIRES_SIGNATURE", "maybe"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=[f"{n}={v}" for n, v in BAD_VALUES])
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    assert name in config_error({**BASE, name: value})


# Values that trip an exception inside Python's own parsers rather than our checks.
ODD_VALUES = [
    ("PORT", "9" * 5000),  # int() refuses more than 4300 digits
    ("CLAIM_THRESHOLD", "9" * 5000),
    ("PRICE_GPT_4O_INPUT", "9" * 5000),
    ("RPC_URL", "http://[abc"),  # urlparse: "Invalid IPv6 URL"
    ("UPSTREAM_BASE_URL", "http://[::1"),
    ("PUBLIC_URL", "https://[x]"),
]


@pytest.mark.parametrize(("name", "value"), ODD_VALUES, ids=[f"{n}={v[:12]}({len(v)} chars)" for n, v in ODD_VALUES])
def test_odd_value_is_still_a_config_error(name: str, value: str) -> None:
    assert name in config_error({**BASE, name: value})


def test_pricing_file_error_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input": "x", "output": 1}}))
    assert config_error({**BASE, "PRICING_FILE": str(path)}).startswith("PRICING_FILE")


def test_pricing_file_with_float_price_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input": 7.5, "output": 1}}))
    assert config_error({**BASE, "PRICING_FILE": str(path)}).startswith("PRICING_FILE")


def test_missing_openai_key_with_default_upstream() -> None:
    assert config_error({"PROVIDER_PRIVATE_KEY": KEY_HEX}).startswith("OPENAI_API_KEY")


def test_missing_openai_key_with_explicit_openai_upstream() -> None:
    env = {"PROVIDER_PRIVATE_KEY": KEY_HEX, "UPSTREAM_BASE_URL": "https://api.openai.com/v1/"}
    assert config_error(env).startswith("OPENAI_API_KEY")


BAD_KEYS = {
    "empty": "",
    "too short": "0x" + "11" * 31,
    "63 digits": "0x" + KEY_HEX[:-1],
    "65 digits": "0x" + KEY_HEX + "7",
    "non-hex": "0x" + "zz" * 32,
    "zero": "0x" + "00" * 32,
    "curve order": "0x" + f"{SECP256K1_N:064x}",
    "above order": "0x" + "ff" * 32,
}


@pytest.mark.parametrize("raw", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_bad_private_key(raw: str) -> None:
    message = config_error({**BASE, "PROVIDER_PRIVATE_KEY": raw})
    assert message.startswith("PROVIDER_PRIVATE_KEY")
    digits = raw.removeprefix("0x")
    if digits:  # not even a prefix of the value is echoed
        assert digits[:16] not in message


def test_missing_private_key() -> None:
    assert config_error({"OPENAI_API_KEY": OPENAI_KEY}).startswith("PROVIDER_PRIVATE_KEY")


def test_short_admin_token_is_not_echoed() -> None:
    token = "s3cr3t-tok"
    message = config_error({**BASE, "ADMIN_TOKEN": token})
    assert message.startswith("ADMIN_TOKEN")
    assert token not in message


def test_url_credentials_are_not_echoed() -> None:
    message = config_error({**BASE, "RPC_URL": "ftp://user:rpc-api-key-123@example.com/"})
    assert "RPC_URL" in message and "rpc-api-key-123" not in message


# No message quotes the value it refuses, whichever variable it was set as: an operator who
# pastes an API key on the wrong line (as PORT, as LOG_LEVEL) must not find it in a log.
URL_SETTINGS = {"RPC_URL", "UPSTREAM_BASE_URL", "PUBLIC_URL"}
EVERY_NAME = sorted(
    {name for s in SETTINGS for name in (s.name, *s.aliases)} | {"PRICE_GPT_4O_INPUT", "PRICE_GPT4O_OUTPUT"}
)
MARK = "SECRET"
HOSTILE_VALUES = [
    "sk-SECRET-123abc",
    "sk-SECRET-123abc:x",  # a URL parser reads "sk-secret-123abc" as its scheme
    "0xSECRET" + "ab" * 29,
    "SECRET-0123456789abcdef",
    "ftp://user:SECRET@example.com/",
    "http://[SECRET",
    "https://example.com/SECRET?key=SECRET:",
    "SECRET " * 1000,
    "9" * 30 + "SECRET",
]


def test_the_secrets_are_the_ones_we_know() -> None:
    assert {s.name for s in SETTINGS if s.secret} == {
        "PROVIDER_PRIVATE_KEY",
        "OPENAI_API_KEY",
        "ADMIN_TOKEN",
        "DATABASE_URL",
    }
    assert URL_SETTINGS.issubset(s.name for s in SETTINGS)


@pytest.mark.parametrize("name", EVERY_NAME)
def test_no_message_quotes_the_value(name: str) -> None:
    refused = 0
    for value in HOSTILE_VALUES:
        try:
            load_settings({**BASE, name: value})
        except ConfigError as exc:
            refused += 1
            assert name in str(exc)
            assert MARK.lower() not in str(exc).lower(), value
    # Free text (HOST, a key, a path) takes anything; every other variable refuses something.
    assert refused or name in {"HOST", "OPENAI_API_KEY", "ADMIN_TOKEN", "DATABASE_PATH", "STORAGE_PATH"}


@pytest.mark.parametrize(
    "content",
    [
        '{"m": {"input": "sk-SECRET-123abc", "output": 1}}',
        '{"m": {"input": 1, "output": "SECRET"}}',
        "OPENAI_API_KEY=sk-SECRET-123abc",  # a .env given as the pricing file
        '["sk-SECRET-123abc"]',
    ],
)
def test_no_pricing_file_message_quotes_its_contents_or_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "sk-SECRET-123abc.json"
    path.write_text(content)
    for env in ({"PRICING_FILE": str(path)}, {"PRICING_FILE": str(tmp_path / "SECRET-missing.json")}):
        message = config_error({**BASE, **env})
        assert message.startswith("PRICING_FILE") and MARK not in message


def test_secret_entries_are_hidden_from_repr() -> None:
    """`secret` in the table and `repr=False` on the field say the same thing."""
    hidden = {f.name for f in dataclasses.fields(Settings) if not f.repr}
    assert hidden == {s.field for s in SETTINGS if s.secret}


def test_repr_hides_secrets() -> None:
    s = settings(ADMIN_TOKEN=ADMIN_TOKEN)
    text = repr(s)
    for secret in (KEY_HEX, KEY_HEX.upper(), repr(s.provider_private_key), OPENAI_KEY, ADMIN_TOKEN):
        assert secret not in text
    assert "chain_id=137" in text  # the repr is still useful


# --- .env and the environment ----------------------------------------------------------------


def test_read_environment_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=abc\nDRAIN_TEST_ONLY_IN_FILE=from-file\n")
    monkeypatch.setenv("PORT", "4000")
    merged = read_environment(env_file)
    assert merged["PORT"] == "4000"
    assert merged["DRAIN_TEST_ONLY_IN_FILE"] == "from-file"


def test_read_environment_without_file(tmp_path: Path) -> None:
    assert read_environment(tmp_path / "missing.env") == dict(os.environ)


# --- the CLI ---------------------------------------------------------------------------------

PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT", "PYTHONPATH")  # PYTHONPATH: this checkout


def run_cli(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m drain_provider` in `cwd` with a minimal environment plus `env`."""
    base = {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}
    return subprocess.run(
        [sys.executable, "-m", "drain_provider"],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], variable: str, secret: str | None = None) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr
    if secret:
        assert secret not in result.stderr + result.stdout
    return lines[0]


CLI_CASES = {
    "bad port": ({**BASE, "PORT": "abc"}, "PORT", None),
    "missing key": ({"OPENAI_API_KEY": OPENAI_KEY}, "PROVIDER_PRIVATE_KEY", None),
    "non-hex key": ({**BASE, "PROVIDER_PRIVATE_KEY": "0x" + "zz" * 32}, "PROVIDER_PRIVATE_KEY", "zz" * 32),
    "63-digit key": ({**BASE, "PROVIDER_PRIVATE_KEY": KEY_HEX[:-1]}, "PROVIDER_PRIVATE_KEY", KEY_HEX[:-1]),
    "short admin token": ({**BASE, "ADMIN_TOKEN": "s3cr3t-tok"}, "ADMIN_TOKEN", "s3cr3t-tok"),
    "missing openai key": ({"PROVIDER_PRIVATE_KEY": KEY_HEX}, "OPENAI_API_KEY", KEY_HEX),
    "unknown chain": ({**BASE, "CHAIN_ID": "31337"}, "DRAIN_CONTRACT", KEY_HEX),
    "bad log level": ({**BASE, "LOG_LEVEL": "LOUD"}, "LOG_LEVEL", OPENAI_KEY),
}


@pytest.mark.parametrize(("env", "variable", "secret"), CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_bad_config_is_one_line(tmp_path: Path, env: dict[str, str], variable: str, secret: str | None) -> None:
    assert_one_line_error(run_cli(tmp_path, env), variable, secret)


def test_cli_bad_url_is_one_line(tmp_path: Path) -> None:
    """A URL Python's urlparse itself refuses must not escape as a traceback."""
    assert_one_line_error(run_cli(tmp_path, {**BASE, "RPC_URL": "http://[abc"}), "RPC_URL", KEY_HEX)


def test_cli_reads_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"PROVIDER_PRIVATE_KEY=0x{KEY_HEX}\nOPENAI_API_KEY={OPENAI_KEY}\nPORT=abc\n")
    line = assert_one_line_error(run_cli(tmp_path, {}), "PORT", KEY_HEX)
    assert "digits only" in line  # abc, from .env


def test_cli_environment_wins_over_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"PROVIDER_PRIVATE_KEY=0x{KEY_HEX}\nOPENAI_API_KEY={OPENAI_KEY}\nPORT=abc\n")
    line = assert_one_line_error(run_cli(tmp_path, {"PORT": "70000"}), "PORT", KEY_HEX)
    assert "from 1 to 65535" in line and "digits only" not in line  # 70000, from the environment
