"""The provider's key at rest: `keygen` writes an encrypted keystore and, on request, its password
file, both 0600, never over an existing file, printing the settings that use them and never the
key or the password; PROVIDER_KEYSTORE + PROVIDER_KEYSTORE_PASSWORD_FILE load the same key as
PROVIDER_PRIVATE_KEY would, and every way they can be wrong is one line naming the variable,
never echoing the password."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values
from eth_account import Account

from drain_provider.config import ConfigError, load_settings

BASE = {"OPENAI_API_KEY": "sk-test-keys", "CHAIN_ID": "80002"}
PASSWORD = "a-long-enough-test-password"
PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT", "PYTHONPATH")


def python_m(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m drain_provider ARGS` in `cwd`, stdin not a terminal, a minimal environment."""
    base = {k: os.environ[k] for k in PASSTHROUGH if k in os.environ}
    return subprocess.run(
        [sys.executable, "-m", "drain_provider", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("drain-provider: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_secret(path: Path, text: str, file_mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(file_mode)
    return path


def quick_keystore(tmp_path: Path, key: bytes, password: str = PASSWORD, name: str = "keystore.json") -> Path:
    """A keystore as keygen writes it, with scrypt's cost turned down so the tests do not pay a
    second per decryption (`load_settings` reads the cost from the file)."""
    return write_secret(tmp_path / name, json.dumps(Account.encrypt(key, password, iterations=2**4)))


def keystore_env(keystore: Path, password_file: Path) -> dict[str, str]:
    return {**BASE, "PROVIDER_KEYSTORE": str(keystore), "PROVIDER_KEYSTORE_PASSWORD_FILE": str(password_file)}


def config_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    return str(caught.value)


# --- keygen ------------------------------------------------------------------------------------


def test_keygen_writes_a_private_keystore_and_the_settings_that_use_it(tmp_path: Path) -> None:
    result = python_m(tmp_path, "keygen", "--new-password-file", "data/keystore-password")
    assert result.returncode == 0, result.stderr
    keystore, password_file = tmp_path / "data" / "provider-keystore.json", tmp_path / "data" / "keystore-password"
    assert mode(keystore) == mode(password_file) == 0o600
    assert mode(tmp_path / "data") == 0o700
    password = password_file.read_text().rstrip("\n")
    assert len(password) >= 40  # 256 random bits
    stored = json.loads(keystore.read_text())
    assert stored["crypto"]["kdf"] == "scrypt"
    key = bytes(Account.decrypt(stored, password))
    address = Account.from_key(key).address
    # stdout is .env lines (`>> .env`), the address in a comment; stderr says the rest. No secret.
    printed = dotenv_values(stream=io.StringIO(result.stdout))
    assert printed == {
        "PROVIDER_KEYSTORE": "data/provider-keystore.json",
        "PROVIDER_KEYSTORE_PASSWORD_FILE": "data/keystore-password",
    }
    assert address in result.stdout and address in result.stderr
    for secret in (key.hex(), password):
        assert secret not in result.stdout + result.stderr
    # Those settings load that key (the real scrypt cost: the one keygen wrote).
    settings = load_settings({**BASE, **{k: str(tmp_path / v) for k, v in printed.items() if v}})
    assert settings.provider_private_key == key and settings.provider_address == address
    assert key.hex() not in repr(settings)

    # Again: nothing is replaced, neither the keystore nor the password file.
    before = (keystore.read_bytes(), password_file.read_bytes())
    one_line_error(python_m(tmp_path, "keygen", "--new-password-file", "data/other-password"), "--out", "exists")
    assert not (tmp_path / "data" / "other-password").exists()
    one_line_error(python_m(tmp_path, "keygen", "--out", "new.json", "--new-password-file", "data/keystore-password"))
    assert (keystore.read_bytes(), password_file.read_bytes()) == before
    assert not (tmp_path / "new.json").exists()


def test_keygen_with_a_password_file(tmp_path: Path) -> None:
    write_secret(tmp_path / "password", PASSWORD + "\n")
    result = python_m(tmp_path, "keygen", "--out", "keys/provider.json", "--password-file", "password")
    assert result.returncode == 0, result.stderr
    key = bytes(Account.decrypt(json.loads((tmp_path / "keys" / "provider.json").read_text()), PASSWORD))
    assert mode(tmp_path / "keys" / "provider.json") == 0o600
    assert PASSWORD not in result.stdout + result.stderr and key.hex() not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "setup", "needle"),
    [
        ((), None, "no password"),  # no file and no terminal
        (("--password-file", "password"), 0o644, "chmod 600"),  # others can read it
        (("--password-file", "password"), "short", "shorter than 8"),
        (("--password-file", "password"), "", "empty"),
        (("--password-file", "missing"), None, "cannot read"),
    ],
    ids=["no password", "world-readable", "short", "empty", "missing"],
)
def test_keygen_refuses_a_bad_password_source(
    tmp_path: Path, args: tuple[str, ...], setup: object, needle: str
) -> None:
    if isinstance(setup, int):
        write_secret(tmp_path / "password", PASSWORD, setup)
    elif isinstance(setup, str):
        write_secret(tmp_path / "password", setup)
    line = one_line_error(python_m(tmp_path, "keygen", *args), needle)
    assert PASSWORD not in line
    assert not (tmp_path / "data").exists()  # no keystore without a password


# --- the settings ------------------------------------------------------------------------------


def test_keystore_settings_load_the_key(tmp_path: Path) -> None:
    key = bytes(Account.create().key)
    password_file = write_secret(tmp_path / "password", PASSWORD + "\nignored second line\n")
    settings = load_settings(keystore_env(quick_keystore(tmp_path, key), password_file))
    assert settings.provider_private_key == key
    raw = load_settings({**BASE, "PROVIDER_PRIVATE_KEY": "0x" + key.hex()})
    assert settings.provider_address == raw.provider_address
    assert settings.provider_keystore == tmp_path / "keystore.json"


def test_one_way_to_the_key(tmp_path: Path) -> None:
    key = bytes(Account.create().key)
    keystore = quick_keystore(tmp_path, key)
    password_file = write_secret(tmp_path / "password", PASSWORD)
    both = {**keystore_env(keystore, password_file), "PROVIDER_PRIVATE_KEY": "0x" + key.hex()}
    assert config_error(both).startswith("PROVIDER_KEYSTORE: set, and so is PROVIDER_PRIVATE_KEY")
    neither = config_error(BASE)
    assert neither.startswith("PROVIDER_PRIVATE_KEY: not set")
    assert "PROVIDER_KEYSTORE" in neither and "PROVIDER_KEYSTORE_PASSWORD_FILE" in neither
    no_password = {**BASE, "PROVIDER_KEYSTORE": str(keystore)}
    assert config_error(no_password).startswith("PROVIDER_KEYSTORE_PASSWORD_FILE: not set")
    no_keystore = {**BASE, "PROVIDER_PRIVATE_KEY": key.hex(), "PROVIDER_KEYSTORE_PASSWORD_FILE": str(password_file)}
    assert config_error(no_keystore).startswith("PROVIDER_KEYSTORE_PASSWORD_FILE: set without PROVIDER_KEYSTORE")


def test_a_scrypt_cost_that_would_exhaust_memory_is_refused_unrun(tmp_path: Path) -> None:
    keystore = json.loads(quick_keystore(tmp_path, bytes(Account.create().key)).read_text())
    keystore["crypto"]["kdfparams"]["n"] = 2**30  # 128 GiB: refused before scrypt runs
    path = write_secret(tmp_path / "huge.json", json.dumps(keystore))
    message = config_error(keystore_env(path, write_secret(tmp_path / "password", PASSWORD)))
    assert message.startswith("PROVIDER_KEYSTORE:") and "1 GiB" in message


BROKEN = {
    "wrong password": ("wrong-password-123", None, "PROVIDER_KEYSTORE_PASSWORD_FILE", "wrong password"),
    "password others read": (PASSWORD, "password 0o640", "PROVIDER_KEYSTORE_PASSWORD_FILE", "chmod 600"),
    "keystore others read": (PASSWORD, "keystore 0o604", "PROVIDER_KEYSTORE", "chmod 600"),
    "empty password file": ("", None, "PROVIDER_KEYSTORE_PASSWORD_FILE", "empty"),
    "not JSON": (PASSWORD, "keystore text", "PROVIDER_KEYSTORE", "not a JSON keystore"),
    "JSON, not a keystore": (PASSWORD, "keystore json", "PROVIDER_KEYSTORE", "not a JSON keystore"),
    "unknown kdf": (PASSWORD, "keystore kdf", "PROVIDER_KEYSTORE", "not a keystore eth-account can read"),
    "no keystore file": (PASSWORD, "keystore missing", "PROVIDER_KEYSTORE", "cannot read"),
    "a directory": (PASSWORD, "keystore directory", "PROVIDER_KEYSTORE", "cannot read"),
    "no password file": (PASSWORD, "password missing", "PROVIDER_KEYSTORE_PASSWORD_FILE", "cannot read"),
}


def broken_setup(tmp_path: Path, password: str, damage: str | None) -> dict[str, str]:
    keystore = quick_keystore(tmp_path, bytes(Account.create().key))
    password_file = write_secret(tmp_path / "password", password + "\n")
    what, _, how = (damage or "").partition(" ")
    target = keystore if what == "keystore" else password_file
    if how.startswith("0o"):
        target.chmod(int(how, 8))
    elif how == "text":
        write_secret(target, "this is not JSON")
    elif how == "json":
        write_secret(target, '{"version": 3}')
    elif how == "kdf":
        stored = json.loads(keystore.read_text())
        stored["crypto"]["kdf"] = "argon9"
        write_secret(keystore, json.dumps(stored))
    elif how == "missing":
        target.unlink()
    elif how == "directory":
        target.unlink()
        target.mkdir()
    return keystore_env(keystore, password_file)


@pytest.mark.parametrize(("password", "damage", "variable", "needle"), BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_keystore_is_one_line(
    tmp_path: Path, password: str, damage: str | None, variable: str, needle: str
) -> None:
    message = config_error(broken_setup(tmp_path, password, damage))
    assert message.startswith(f"{variable}:") and needle in message
    for secret in (PASSWORD, "wrong-password-123"):
        assert secret not in message


def test_the_command_line_says_it_in_one_line(tmp_path: Path) -> None:
    """Every command that loads the settings: exit 2, one line, the password nowhere."""
    env = broken_setup(tmp_path, "wrong-password-123", None)
    for command in ("doctor", "status", "serve", "withdraw"):
        line = one_line_error(python_m(tmp_path, command, env=env), "wrong password")
        assert "wrong-password-123" not in line and PASSWORD not in line


def test_dev_ignores_the_keystore_of_env(tmp_path: Path) -> None:
    """`dev` runs on its own throwaway key: a .env set up for a keystore neither clashes with it
    nor makes it pay for scrypt."""
    (tmp_path / ".env").write_text(
        "PROVIDER_KEYSTORE=data/provider-keystore.json\nPROVIDER_KEYSTORE_PASSWORD_FILE=data/keystore-password\n"
    )
    result = python_m(tmp_path, "dev", "--no-serve", env={"LOG_LEVEL": "ERROR"})
    assert result.returncode == 0, result.stderr
