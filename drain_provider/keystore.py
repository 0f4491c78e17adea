"""The provider's key at rest: an encrypted JSON keystore (Web3 Secret Storage, version 3, as
geth, Foundry's `cast wallet` and eth-account write it) and a file holding its password.

`python -m drain_provider keygen` makes both; `load_settings` decrypts the key at start from
PROVIDER_KEYSTORE and PROVIDER_KEYSTORE_PASSWORD_FILE, so that the raw key is never in `.env`.
Both files must be readable by their owner only (chmod 600): a keystore others can read can be
attacked offline, password guess by password, and a password others can read opens it. Every
error is one line naming the variable or flag, never the password, and never the key.
"""

from __future__ import annotations

import getpass
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from .privatefile import create_private, exposed

DEFAULT_KEYSTORE = Path("data/provider-keystore.json")
MIN_PASSWORD = 8
MAX_FILE_BYTES = 1024 * 1024
# scrypt needs 128 * r * n bytes: geth's and eth-account's defaults (n = 2^18, r = 8) take 256 MiB.
# A keystore asking for more than 1 GiB would take the server down at start rather than open.
MAX_SCRYPT_MEMORY = 1024**3


class KeystoreError(Exception):
    """A keystore or password file that cannot be used. str() is one line, safe to show."""


def _read_owner_only(path: Path, name: str) -> str:
    try:
        with path.open("rb") as file:
            if exposed(file.fileno()):  # the file read, not the one a name pointed to a moment ago
                raise KeystoreError(f"{name}: the file is readable by other users; make it yours alone: chmod 600 FILE")
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise KeystoreError(f"{name}: cannot read the file ({type(exc).__name__})") from None
    if len(data) > MAX_FILE_BYTES:
        raise KeystoreError(f"{name}: the file is larger than 1 MiB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise KeystoreError(f"{name}: the file is not UTF-8 text") from None


def read_password(path: Path, name: str) -> str:
    """The password: the file's first line, without its line ending (a password file written by
    `echo` or an editor ends with one)."""
    lines = _read_owner_only(path, name).splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise KeystoreError(f"{name}: the file is empty; its first line must be the password")
    return password


def _check_kdf(keystore: dict[str, Any]) -> None:
    crypto = keystore.get("crypto", keystore.get("Crypto"))
    if not isinstance(crypto, dict) or not isinstance(crypto.get("kdfparams"), dict):
        raise ValueError("no crypto.kdfparams")
    params = crypto["kdfparams"]
    if crypto.get("kdf") == "scrypt" and 128 * int(params.get("r", 8)) * int(params.get("n", 0)) > MAX_SCRYPT_MEMORY:
        raise OverflowError("scrypt parameters too large")


def decrypt_keystore(keystore_path: Path, password_path: Path, *, keystore_name: str, password_name: str) -> bytes:
    """The private key in the keystore, decrypted with the password file's password (scrypt:
    about a second, once at start). eth-account is imported here, not with the settings: a
    provider with a raw key does not wait for it."""
    from eth_account import Account

    password = read_password(password_path, password_name)
    text = _read_owner_only(keystore_path, keystore_name)
    try:
        keystore = json.loads(text)
        if not isinstance(keystore, dict):
            raise ValueError("not an object")
        _check_kdf(keystore)
    except OverflowError:
        raise KeystoreError(f"{keystore_name}: the keystore's scrypt parameters need more than 1 GiB") from None
    except (ValueError, TypeError):
        raise KeystoreError(f"{keystore_name}: the file is not a JSON keystore (version 3)") from None
    try:
        key = bytes(Account.decrypt(keystore, password))
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise KeystoreError(
                f"{password_name}: wrong password for the keystore of {keystore_name} (MAC mismatch)"
            ) from None
        raise KeystoreError(f"{keystore_name}: the file is not a keystore eth-account can read") from None
    except Exception:  # eth-keyfile's own errors on unknown kdfs, ciphers, versions, field types
        raise KeystoreError(f"{keystore_name}: the file is not a keystore eth-account can read") from None
    stated = str(keystore.get("address", "")).lower().removeprefix("0x")
    if stated and stated != Account.from_key(key).address.lower()[2:]:
        raise KeystoreError(f"{keystore_name}: the keystore's address is not its key's: the file is damaged")
    return key


# --- keygen ------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _password(password_file: Path | None, new_password_file: Path | None) -> str:
    if new_password_file is not None:
        password = secrets.token_urlsafe(32)  # 256 bits
        try:
            create_private(new_password_file, password + "\n")
        except FileExistsError:
            raise KeystoreError("--new-password-file: the file exists; keygen replaces nothing") from None
        except OSError as exc:
            raise KeystoreError(f"--new-password-file: cannot write it ({type(exc).__name__})") from None
        return password
    if password_file is not None:
        password = read_password(password_file, "--password-file")
    elif sys.stdin.isatty():
        password = getpass.getpass("keystore password: ")
        if getpass.getpass("again: ") != password:
            raise KeystoreError("the two passwords differ")
    else:
        raise KeystoreError(
            "no password: pass --password-file FILE, or --new-password-file FILE to make one, or run on a terminal"
        )
    if len(password) < MIN_PASSWORD:
        raise KeystoreError(f"the password is shorter than {MIN_PASSWORD} characters")
    return password


def keygen(out: Path, password_file: Path | None, new_password_file: Path | None) -> int:
    """`python -m drain_provider keygen`: a new key, encrypted to `out` (0600, never replacing a
    file). Prints the settings that use it (stdout: `>> .env` adds them) and the address and next
    steps (stderr); never the key nor the password."""
    from eth_account import Account

    if out.exists():
        raise KeystoreError("--out: the file exists; keygen replaces nothing (move it, or choose another --out)")
    password = _password(password_file, new_password_file)
    account = Account.create()
    keystore = Account.encrypt(account.key, password)  # scrypt, n = 2^18: about a second to open
    try:
        create_private(out, json.dumps(keystore) + "\n")
    except FileExistsError:
        raise KeystoreError("--out: the file exists; keygen replaces nothing") from None
    except OSError as exc:
        raise KeystoreError(f"--out: cannot write it ({type(exc).__name__})") from None
    password_path = new_password_file or password_file
    print(f"# the provider key {account.address}, made by `python -m drain_provider keygen`")
    print(f"PROVIDER_KEYSTORE={out}")
    if password_path is not None:
        print(f"PROVIDER_KEYSTORE_PASSWORD_FILE={password_path}")
    else:
        print("# PROVIDER_KEYSTORE_PASSWORD_FILE=  (a file holding the password on its first line, chmod 600)")
    _say(f"provider address {account.address}")
    _say(f"keystore {out} (encrypted, 0600)" + (f", password in {password_path} (0600)" if password_path else ""))
    _say(
        "next: put the PROVIDER_KEYSTORE lines above in .env (`>> .env` does) in place of PROVIDER_PRIVATE_KEY; "
        "send the address POL for gas; keep copies of the keystore and of its password apart: "
        "the key exists nowhere else"
    )
    return 0
