"""What stops a start, and how: a ledger that cannot be opened is one line naming DATABASE_PATH
and exit code 2 for every command, never a traceback nor a thread left running; a contract that
is not there, or not the version set, is found before the first request; `--version`."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from drain_provider import __version__
from drain_provider.chain import ChainClient
from drain_provider.checks import Result, check_chain, open_ledger
from drain_provider.cli import main
from drain_provider.config import ConfigError, Settings
from drain_provider.devtools.devchain import DevChain

PROC = Path("/proc")


def settings_for(database: Path, chain: DevChain | None = None, **overrides: Any) -> Settings:
    return Settings(
        provider_private_key=bytes(Account.create().key),
        chain_id=chain.chain_id if chain else 31337,
        drain_contract=chain.contract if chain else "0x" + "ab" * 20,
        contract_version="v2",
        rpc_url=None,
        database_path=database,
        **overrides,
    )


def _directory(tmp: Path) -> Path:
    (tmp / "ledger.db").mkdir()
    return tmp / "ledger.db"


def _not_sqlite(tmp: Path) -> Path:
    (tmp / "ledger.db").write_bytes(os.urandom(4096))
    return tmp / "ledger.db"


def _file_as_directory(tmp: Path) -> Path:
    (tmp / "data").write_text("not a directory")
    return tmp / "data" / "drain.db"


ON_LINUX = pytest.mark.skipif(not PROC.is_dir(), reason="needs Linux's /proc, where not even root creates files")
LEDGER_PROBLEMS = [
    pytest.param(_directory, "is a directory", id="a directory"),
    pytest.param(_not_sqlite, "is not a SQLite database", id="not SQLite"),
    pytest.param(_file_as_directory, "a file stands where its directory should be", id="a file as its directory"),
    pytest.param(
        lambda tmp: PROC / "drain-test" / "drain.db",
        "its directory cannot be created",
        id="a directory nobody can create",
        marks=ON_LINUX,
    ),
    pytest.param(
        lambda tmp: PROC / "drain-test.db",
        "cannot be opened or created",
        id="a directory nobody can write",
        marks=ON_LINUX,
    ),
]


@pytest.mark.parametrize(("make", "problem"), LEDGER_PROBLEMS)
async def test_a_ledger_that_cannot_open_is_one_config_error(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    threads = running_threads()
    with pytest.raises(ConfigError) as info:
        await open_ledger(settings_for(make(tmp_path)))
    message = str(info.value)
    assert message.startswith("DATABASE_PATH: ") and problem in message
    assert str(tmp_path) not in message and "/proc" not in message  # the rule it breaks, not the value
    assert running_threads() == threads  # the ledger's threads are gone


def running_threads() -> set[str]:
    """Besides the event loop's executor (asyncio.to_thread's pool stays for the next call)."""
    return {t.name for t in threading.enumerate() if not t.name.startswith("asyncio_")}


# --- the command line ---------------------------------------------------------------------------


def cli(
    args: list[str], env: dict[str, str], cwd: Path, *, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    base = {k: os.environ[k] for k in ("PATH", "LANG", "PYTHONPATH", "SYSTEMROOT") if k in os.environ}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "drain_provider", *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(run: subprocess.CompletedProcess[str], *words: str) -> str:
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("drain-provider: configuration error: ") and "Traceback" not in run.stderr
    assert all(word in line for word in words), line
    return line


ENV = {
    "PROVIDER_PRIVATE_KEY": "0x" + "11" * 32,
    "CHAIN_ID": "31337",
    "DRAIN_CONTRACT": "0x" + "ab" * 20,
    "RPC_URL": "http://127.0.0.1:9",  # nothing listens: the ledger is opened first
    "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
    "LOG_LEVEL": "WARNING",
}


@pytest.mark.parametrize("command", ["serve", "status", "claim"])  # dev: below
def test_every_command_says_what_is_wrong_with_the_ledger_in_one_line(tmp_path: Path, command: str) -> None:
    (tmp_path / "ledger.db").mkdir()
    one_line(cli([command], {**ENV, "DATABASE_PATH": "ledger.db"}, tmp_path), "DATABASE_PATH: is a directory")


def test_dev_says_what_is_wrong_in_one_line_too(tmp_path: Path) -> None:
    """A dev node that does not answer; a file where data/ (the dev ledger's directory) should be."""
    one_line(cli(["dev", "--rpc-url", "http://127.0.0.1:9", "--no-serve"], {}, tmp_path), "--rpc-url: no dev node")
    (tmp_path / "data").write_text("not a directory")
    one_line(cli(["dev", "--no-serve"], {}, tmp_path), "DATABASE_PATH: a file stands where its directory should be")


@contextlib.contextmanager
def shared_directory() -> Iterator[Path]:
    """A directory outside pytest's private tmp, which nobody can reach."""
    directory = Path(tempfile.mkdtemp(prefix="drain-test-"))
    try:
        yield directory
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


def unprivileged() -> tuple[str, ...]:
    """Root writes whatever the file modes say: the read-only cases run as nobody then."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop privileges")
    return ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_a_read_only_ledger_or_directory_is_one_line() -> None:
    with shared_directory() as directory:
        directory.chmod(0o777)
        ledger = directory / "ledger.db"
        with contextlib.closing(sqlite3.connect(ledger)) as conn:
            conn.execute("CREATE TABLE t (x)")
        ledger.chmod(0o444)
        run = cli(["serve"], {**ENV, "DATABASE_PATH": str(ledger)}, directory, prefix=unprivileged())
        one_line(run, "DATABASE_PATH: is not writable")
        directory.chmod(0o555)
        run = cli(["serve"], {**ENV, "DATABASE_PATH": str(directory / "new.db")}, directory, prefix=unprivileged())
        one_line(run, "DATABASE_PATH: cannot be opened or created")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"drain-provider {__version__}\n"


# --- the chain ------------------------------------------------------------------------------------


async def test_a_contract_of_another_version_is_a_warning(chain: DevChain, tmp_path: Path) -> None:
    """The test token has code but no feeBps(): not the V2 contract DRAIN_CONTRACT_VERSION says."""
    settings = settings_for(tmp_path / "ledger.db", chain)
    checks = await check_chain(ChainClient(chain.w3, chain.token), settings)
    assert [(c.name, c.result) for c in checks] == [
        ("rpc", Result.OK),
        ("chain id", Result.OK),
        ("contract", Result.WARN),
    ]
    assert "looks like v1" in checks[-1].detail
    good = await check_chain(chain.client(), settings)
    assert good[-1].result is Result.OK and good[-1].detail.endswith(", v2")
