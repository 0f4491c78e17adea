"""`python -m drain_provider dev` as a newcomer runs it: start, read data/dev.json, run the printed
openai SDK snippet against it from another process, stop with Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port

DEV_KEYS = {
    "api",
    "chainId",
    "rpcUrl",
    "contract",
    "contracts",
    "token",
    "provider",
    "consumer",
    "consumerKit",
    "channelId",
    "deposit",
    "lastNonce",
    "lastAmount",
}


def clean_env() -> dict[str, str]:
    """This machine's environment minus anything that would point dev at a real upstream."""
    env = {k: v for k, v in os.environ.items() if k not in ("UPSTREAM_BASE_URL", "OPENAI_API_KEY", "DATABASE_PATH")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_dev_mode_serves_paid_calls_from_the_printed_snippet(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "drain_provider", "dev", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = wait_for_banner(proc)
        ready = re.search(r"ready in ([0-9.]+) s", banner)
        assert ready, banner
        assert "cost " in banner and "Traceback" not in banner

        facts = json.loads((tmp_path / "data" / "dev.json").read_text())
        assert set(facts) == DEV_KEYS
        assert facts["api"] == f"http://127.0.0.1:{port}/v1"
        assert facts["rpcUrl"] is None and facts["lastNonce"] == "1" and facts["consumerKit"] is None
        assert facts["contracts"][0] == {"address": facts["contract"], "version": "v2"}
        assert "dev --anvil` gives them one" in banner
        assert int(facts["lastAmount"]) > 0 and int(facts["deposit"]) == 10_000_000

        # The snippet the banner prints, pasted into bash as it is, twice (the nonce must carry over).
        start = banner.index("python - <<'EOF'\n")
        snippet = banner[start : banner.index("\nEOF\n", start) + len("\nEOF\n")]
        env = {**clean_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for expected_nonce in ("2", "3"):
            run = subprocess.run(
                ["bash", "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
            )
            assert run.returncode == 0, run.stderr
            assert "| cost" in run.stdout and "demo model" in run.stdout
            assert json.loads((tmp_path / "data" / "dev.json").read_text())["lastNonce"] == expected_nonce
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0


def wait_for_banner(proc: subprocess.Popen[str]) -> str:
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while not any(line.startswith("Press Ctrl-C") for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        lines.append(proc.stdout.readline())
    return "".join(lines)


def test_outside_clients_pay_dev_over_its_anvil(tmp_path: Path) -> None:
    """`dev --anvil`: anvil started from node_modules, the contracts on it, and its RPC URL in the
    banner and dev.json. A viem script (approve, open, signTypedData, one paid request) and the
    consumer kit's CLI (`open`, `chat`), both from other processes, pay the provider; anvil
    stops with dev."""
    port, anvil_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "drain_provider",
            "dev",
            "--anvil",
            "--anvil-port",
            str(anvil_port),
            "--port",
            str(port),
        ],
        cwd=tmp_path,  # no node_modules here: dev finds the checkout's
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rpc = f"http://127.0.0.1:{anvil_port}"
    try:
        banner = wait_for_banner(proc)
        assert f"chain      {rpc} (anvil, started by dev), chain id 31337" in banner
        facts = json.loads((tmp_path / "data" / "dev.json").read_text())
        assert facts["rpcUrl"] == rpc and facts["chainId"] == 31337
        assert f"contract   {facts['contract']} (v2)" in banner and f"token      {facts['token']}" in banner
        assert (
            facts["consumerKit"] in banner
            and f"export CONSUMER_PRIVATE_KEY={facts['consumer']['privateKey']}" in banner
        )

        viem = subprocess.run(
            ["node", str(REPO / "tests" / "js" / "dev_client.mjs"), str(tmp_path / "data" / "dev.json")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert viem.returncode == 0, viem.stdout + viem.stderr
        paid = json.loads(viem.stdout)
        assert paid["status"] == 200 and int(paid["cost"]) > 0 and "demo model" in paid["content"]
        assert paid["token"] == facts["token"] and paid["channelId"] != facts["channelId"]

        kit_env = {**clean_env(), "CONSUMER_PRIVATE_KEY": facts["consumer"]["privateKey"]}
        opened = subprocess.run(
            [sys.executable, *facts["consumerKit"].split()[1:]],  # as printed, after `python`
            cwd=tmp_path,
            env=kit_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert opened.returncode == 0, opened.stderr
        channel_id = opened.stdout.strip()
        assert channel_id.startswith("0x") and channel_id not in (facts["channelId"], paid["channelId"])
        chat = subprocess.run(
            [sys.executable, "-m", "drain_provider.consumer", "chat", "Hello!"],
            cwd=tmp_path,
            env=kit_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert chat.returncode == 0, chat.stderr
        assert "demo model" in chat.stdout and re.search(r"^cost \d+ total \d+ remaining 4999\d+", chat.stdout, re.M)
        assert facts["consumer"]["privateKey"][2:] not in opened.stdout + opened.stderr + chat.stdout + chat.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    with pytest.raises(OSError):  # anvil is gone with dev
        socket.create_connection(("127.0.0.1", anvil_port), timeout=1).close()


def test_dev_anvil_without_anvil_says_npm_install(tmp_path: Path) -> None:
    env = {**clean_env(), "PATH": os.path.dirname(sys.executable)}  # no anvil on PATH
    fake = tmp_path / "pkg"
    # A copy of the package outside the checkout: no node_modules next to it either.
    shutil.copytree(REPO / "drain_provider", fake / "drain_provider", ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = str(fake)
    run = subprocess.run(
        [sys.executable, "-m", "drain_provider", "dev", "--anvil"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "drain-provider: configuration error: dev --anvil: anvil not found: run `npm install` in the drain-provider "
        "checkout"
    ]
