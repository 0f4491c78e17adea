"""`python -m drain_provider` as a process: a `listening` line once bound, secrets of the RPC URL
in no log line, the open-files limit raised for MAX_CONNECTIONS, prices reloaded on SIGHUP,
a clean stop on SIGTERM or SIGINT even in the middle of a start-up that hangs, and a process
that ends even when a thread would keep it alive."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, free_port

RPC_PASSWORD = "RpcPassw0rdSECRET"
RPC_PATH_KEY = "Zx8kQ2mP9vLr4TnY7wBc1DfGhJ3sKaE5"
RPC_QUERY_KEY = "QueryKeySECRET42"
UPSTREAM_PASSWORD = "UpstreamPassw0rdSECRET"


class Served:
    """A `python -m drain_provider` child whose stderr is read as it comes."""

    def __init__(self, env: dict[str, str], cwd: Path, *, fd_limit: int | None = None) -> None:
        def limit_fds() -> None:
            if fd_limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "drain_provider"],
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit_fds,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.stderr}"
            assert time.monotonic() < deadline, f"no line matching {pattern!r}:\n{self.stderr}"
            time.sleep(0.02)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> float:
        """Send `sig`; how long the process took to end."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(5)
        return time.monotonic() - sent


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    children: list[Served] = []
    yield children
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()


def base_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "PROVIDER_PRIVATE_KEY": "0x" + "11" * 32,
        "CHAIN_ID": "31337",
        "DRAIN_CONTRACT": "0x" + "ab" * 20,
        "RPC_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: the chain is unreachable
        "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "DATABASE_PATH": str(tmp_path / "ledger" / "drain.db"),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "LOG_LEVEL": "INFO",
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"),
    }
    return {**env, **overrides}


def get_models(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp:
        return {model["id"] for model in json.loads(resp.read())["data"]}


def test_a_served_process_logs_where_it_listens_raises_its_fd_limit_and_never_logs_rpc_secrets(
    tmp_path: Path, served: list[Served]
) -> None:
    rpc_port = free_port()
    rpc_url = f"https://user:{RPC_PASSWORD}@127.0.0.1:{rpc_port}/v2/{RPC_PATH_KEY}?apikey={RPC_QUERY_KEY}"
    upstream_url = f"http://proxy-user:{UPSTREAM_PASSWORD}@127.0.0.1:9/v1"
    env = base_env(tmp_path, RPC_URL=rpc_url, UPSTREAM_BASE_URL=upstream_url, LOG_LEVEL="DEBUG", MAX_CONNECTIONS="1000")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    served.append(child := Served(env, tmp_path, fd_limit=256))
    url = child.wait_for_line(r"listening url=(http://\S+) max_connections=1000 header_timeout=15")[1]
    assert url == f"http://127.0.0.1:{env['PORT']}"
    assert get_models(url)  # it serves

    wanted = 1000 * 2 + 128
    if hard == resource.RLIM_INFINITY or hard >= wanted:
        child.wait_for_line(rf"fd_limit_raised from=256 to={wanted}")
        limits = Path(f"/proc/{child.proc.pid}/limits").read_text()
        assert re.search(rf"Max open files\s+{wanted}\s", limits), limits

    assert child.stop(signal.SIGTERM) < 5
    assert child.proc.returncode == 0, child.stderr
    stderr = child.stderr
    assert "stopping signal=SIGTERM" in stderr and "stopped uptime_s=" in stderr
    # web3 logs its provider's URL when it disconnects, and we log the upstream's at the start:
    # there, and everywhere, redacted.
    assert f"Successfully disconnected from: https://***@127.0.0.1:{rpc_port}/v2/***?***" in stderr
    assert "upstream=http://***@127.0.0.1:9/v1 " in stderr
    for secret in (RPC_PASSWORD, RPC_PATH_KEY, RPC_QUERY_KEY, UPSTREAM_PASSWORD):
        assert secret not in stderr
    assert "Traceback" not in stderr and "exit_forced" not in stderr


def test_sighup_reloads_the_prices_and_keeps_them_when_the_new_file_is_bad(
    tmp_path: Path, served: list[Served]
) -> None:
    pricing = tmp_path / "pricing.json"
    pricing.write_text(json.dumps({"alpha-model": {"input": 100, "output": 200}}))
    served.append(child := Served(base_env(tmp_path, PRICING_FILE=str(pricing)), tmp_path))
    url = child.wait_for_line(r"listening url=(\S+)")[1]
    assert "alpha-model" in get_models(url)

    pricing.write_text(json.dumps({"beta-model": {"input": 100, "output": 200}}))
    (tmp_path / ".env").write_text("PRICE_BETA_MODEL_OUTPUT=300\n")  # .env is read again too
    child.proc.send_signal(signal.SIGHUP)
    child.wait_for_line(r"prices_reloaded models=\d+")
    models = get_models(url)
    assert "beta-model" in models and "alpha-model" not in models
    with urllib.request.urlopen(f"{url}/v1/pricing", timeout=5) as resp:
        assert "0.0003" in resp.read().decode()  # beta's output price, from .env: 300 base units

    pricing.write_text("{not json")
    child.proc.send_signal(signal.SIGHUP)
    child.wait_for_line(r"prices_reload_failed error=PRICING_FILE")
    assert get_models(url) == models  # the prices served are the last good ones

    assert child.stop(signal.SIGTERM) < 5
    assert child.proc.returncode == 0, child.stderr
    assert "Traceback" not in child.stderr


@pytest.mark.parametrize(
    ("hangs", "sig"), [("rpc", signal.SIGTERM), ("tokenizer", signal.SIGINT)], ids=["rpc-SIGTERM", "tokenizer-SIGINT"]
)
def test_a_stop_signal_ends_a_start_up_that_hangs(
    tmp_path: Path, served: list[Served], hangs: str, sig: signal.Signals
) -> None:
    """Start-up hangs in the RPC's first call (it accepts and never answers), or in the
    tokenizer's download (behind a proxy that does the same; tiktoken sets no timeout, so a
    thread stays stuck in it): the signal still ends the process, exit code 0, within seconds."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # connections are accepted by the kernel, and never answered
        black_hole = f"http://127.0.0.1:{hole.getsockname()[1]}"
        env = base_env(tmp_path, HTTPS_PROXY=black_hole, https_proxy=black_hole)
        if hangs == "rpc":
            env["RPC_URL"] = black_hole
        served.append(child := Served(env, tmp_path))
        child.wait_for_line("ledger_open " if hangs == "rpc" else "tokenizer_loading ")
        time.sleep(0.5)
        took = child.stop(sig)
    assert child.proc.returncode == 0, child.stderr
    assert took < 6, child.stderr
    assert f"stopping signal={sig.name}" in child.stderr
    assert "listening" not in child.stderr and "Traceback" not in child.stderr
    if hangs == "tokenizer":  # the download's thread would have kept the process alive
        assert re.search(r"exit_forced code=0 threads=worker_\d", child.stderr), child.stderr


def test_a_thread_left_running_cannot_keep_the_process_alive() -> None:
    code = (
        "import threading\n"
        "from drain_provider.process import exit_watched\n"
        "threading.Thread(target=threading.Event().wait, name='stuck-in-a-library').start()\n"
        "raise SystemExit(exit_watched(3, grace=0.5))\n"
    )
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert run.returncode == 3
    assert time.monotonic() - started < 10
    assert "exit_forced code=3 threads=stuck-in-a-library" in run.stderr


def test_the_fd_limit_is_raised_as_far_as_the_hard_limit_allows_and_says_when_that_is_short() -> None:
    code = (
        "import logging, resource\n"
        "logging.basicConfig(level='INFO', format='%(message)s')\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))\n"
        "from drain_provider.server import raise_fd_limit\n"
        "raise_fd_limit(1000)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(300, 300)"
    assert "fd_limit_raised from=200 to=300" in run.stderr
    assert "fd_limit_low limit=300 needed=2128 max_connections=1000" in run.stderr
