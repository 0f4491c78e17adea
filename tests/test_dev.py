"""`python -m drain_provider dev` as a newcomer runs it: start, read data/dev.json, run the printed
openai SDK snippet against it from another process, stop with Ctrl-C."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from helpers import REPO, Upstream, free_port

from drain_provider.config import SETTINGS
from drain_provider.devtools.demo_upstream import DEMO_STATS, create_demo_upstream

SETTING_NAMES = {name for setting in SETTINGS for name in (setting.name, *setting.aliases)}

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
    """This machine's environment (dev reads none of its settings), unbuffered."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


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


# --- zero-config: what dev reads, and what it says -------------------------------------------


class Recorder:
    """A real HTTP server that answers 500 to anything and records the paths it was asked."""

    def __init__(self) -> None:
        calls: list[str] = []
        self.calls = calls

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                calls.append(self.path)
                self.send_error(500)

            do_GET = do_POST = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def production_env(recorder: Recorder, tmp_path: Path, upstream: str) -> dict[str, str]:
    """What a production .env holds, every value of which would break dev or send its calls
    elsewhere: a paid upstream and its key, the real key and a keystore, an address dev cannot
    bind, a port in use, Polygon, another ledger, files that do not exist."""
    return {
        "UPSTREAM_BASE_URL": upstream,
        "OPENAI_API_KEY": "sk-dotenv-secret-0123456789",
        "PROVIDER_PRIVATE_KEY": "0x" + "11" * 32,
        "PROVIDER_KEYSTORE": str(tmp_path / "missing-keystore.json"),
        "HOST": "192.0.2.1",
        "PORT": str(recorder.port),
        "CHAIN_ID": "137",
        "RPC_URL": f"http://127.0.0.1:{recorder.port}/rpc",
        "DRAIN_CONTRACT": "0x" + "ab" * 20,
        "DATABASE_PATH": str(tmp_path / "elsewhere" / "drain.db"),
        "DATABASE_URL": f"postgresql://drain:pg-secret@127.0.0.1:{free_port()}/drain",  # nothing listens
        "PRICING_FILE": str(tmp_path / "missing-prices.json"),
        "MODELS_FILE": str(tmp_path / "missing-models.yaml"),
        "PRICE_GPT_4O_INPUT": "1",
    }


def write_env_file(directory: Path, env: dict[str, str]) -> None:
    (directory / ".env").write_text("".join(f"{name}={value}\n" for name, value in env.items()))


def test_dev_reads_no_settings_from_env_or_the_environment(tmp_path: Path) -> None:
    """A newcomer runs dev next to a production .env (and with an upstream and key exported):
    dev still runs on its own chain with the demo model, on loopback, with its own ledger; the
    upstream named there is never called; the banner says so, names (never shows) what it left
    alone and how to use a real upstream, and, with --no-serve, that it exited."""
    recorder = Recorder()
    try:
        dotenv = production_env(recorder, tmp_path, f"http://127.0.0.1:{recorder.port}/v1")
        write_env_file(tmp_path, dotenv)
        env = {**clean_env(), "UPSTREAM_BASE_URL": dotenv["UPSTREAM_BASE_URL"], "OPENAI_API_KEY": "sk-env-secret-9876"}
        port = free_port()
        run = subprocess.run(
            [sys.executable, "-m", "drain_provider", "dev", "--no-serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        recorder.close()
    assert run.returncode == 0, run.stderr
    assert recorder.calls == []
    out = run.stdout
    assert "upstream   built-in demo model, in this process: no paid upstream is called" in out
    assert "--upstream URL" in out and "--env" in out
    not_used = out.split("not used", 1)[1].split("\n\n", 1)[0]
    assert {"UPSTREAM_BASE_URL", "OPENAI_API_KEY", "HOST", "PORT", "PRICE_GPT_4O_INPUT"} <= set(dotenv)
    assert all(name in not_used for name in dotenv if name in SETTING_NAMES or name.startswith("PRICE_"))
    assert "demo model" in out.split("answer", 1)[1]
    for secret in ("sk-dotenv-secret", "sk-env-secret", "11" * 32):
        assert secret not in out + run.stderr
    assert (tmp_path / "data" / "dev.db").exists() and not (tmp_path / "elsewhere").exists()
    assert json.loads((tmp_path / "data" / "dev.json").read_text())["api"] == f"http://127.0.0.1:{port}/v1"
    # --no-serve: it says it exited, and how to keep it running; it does not offer what is gone.
    assert "Press Ctrl-C" not in out and "python - <<'EOF'" not in out
    assert (
        "Exited after the demo call (--no-serve)" in out and "and the embedded chain and its channels are gone" in out
    )
    assert "without --no-serve to keep it serving" in out


async def recording_upstream(aiohttp_server: Any) -> tuple[Upstream, list[str]]:
    """The demo upstream, served, and the Authorization headers it receives (a middleware)."""
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        return await handler(request)

    app = create_demo_upstream()
    app.middlewares.append(record)
    return Upstream(await aiohttp_server(app), app[DEMO_STATS]), seen


async def dev_no_serve(*args: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drain_provider", "dev", "--no-serve", *args,
        cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_dev_upstream_sells_one_model_of_a_real_upstream(aiohttp_server: Any, tmp_path: Path) -> None:
    """`--upstream URL --upstream-key-env NAME --model M`: the demo call goes there for M with
    the key of NAME (from .env), whatever else .env says."""
    upstream, keys = await recording_upstream(aiohttp_server)
    recorder = Recorder()
    try:
        dotenv = production_env(recorder, tmp_path, f"http://127.0.0.1:{recorder.port}/v1")
        write_env_file(tmp_path, {**dotenv, "MY_UPSTREAM_KEY": "sk-mine-0123456789"})
        code, out, err = await dev_no_serve(
            "--upstream", upstream.url, "--upstream-key-env", "MY_UPSTREAM_KEY", "--model", "llama-3.1-8b",
            "--port", str(free_port()), cwd=tmp_path, env=clean_env(),
        )  # fmt: skip
    finally:
        recorder.close()
    assert code == 0, err
    assert recorder.calls == []
    assert [r["model"] for r in upstream.stats.requests] == ["llama-3.1-8b"]
    assert set(keys) == {"Bearer sk-mine-0123456789"}  # the chat call, and GET /models at start
    assert f"upstream   {upstream.url} (--upstream, selling llama-3.1-8b; key from MY_UPSTREAM_KEY)" in out
    assert "Demo paid call (llama-3.1-8b)" in out and "sk-mine" not in out + err


async def test_dev_env_uses_the_settings_but_not_the_chain_key_ledger_or_address(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """`--env`: .env's upstream, key and PORT, as `serve` reads them; its chain, provider key,
    keystore, ledger and HOST are still dev's own."""
    upstream, keys = await recording_upstream(aiohttp_server)
    recorder = Recorder()
    port = free_port()
    try:
        dotenv = production_env(recorder, tmp_path, upstream.url)
        for missing in ("PRICING_FILE", "MODELS_FILE"):  # read with --env: they must exist
            del dotenv[missing]
        write_env_file(tmp_path, {**dotenv, "PORT": str(port)})
        code, out, err = await dev_no_serve("--env", cwd=tmp_path, env=clean_env())
    finally:
        recorder.close()
    assert code == 0, err
    assert recorder.calls == [] and set(keys) == {"Bearer sk-dotenv-secret-0123456789"}
    assert upstream.stats.requests[0]["model"] == "gpt-3.5-turbo"  # the first model priced
    assert f"upstream   {upstream.url} (--env: from .env and the environment)" in out
    not_used = out.split("not used", 1)[1].split("\n\n", 1)[0]
    owned = {
        "CHAIN_ID",
        "DATABASE_PATH",
        "DATABASE_URL",
        "DRAIN_CONTRACT",
        "HOST",
        "PROVIDER_KEYSTORE",
        "PROVIDER_PRIVATE_KEY",
        "RPC_URL",
    }
    assert all(name in not_used for name in owned & SETTING_NAMES)
    assert "UPSTREAM_BASE_URL" not in not_used and "PORT," not in not_used
    assert json.loads((tmp_path / "data" / "dev.json").read_text())["api"] == f"http://127.0.0.1:{port}/v1"
    assert not (tmp_path / "elsewhere").exists() and "sk-dotenv-secret" not in out + err
    assert "pg-secret" not in out + err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--model", "m"], "--model: only with --upstream URL"),
        (["--upstream-key-env", "K"], "--upstream-key-env: only with --upstream URL"),
        (["--upstream", "ftp://x"], "--upstream: must be an http:// or https:// URL with a host"),
        (
            ["--upstream", "http://127.0.0.1:9/v1", "--upstream-key-env", "sk-abc-123"],
            "--upstream-key-env: must be the name of an environment variable",  # a key pasted as the name: not shown
        ),
        (
            ["--upstream", "http://127.0.0.1:9/v1", "--upstream-key-env", "NOT_SET_HERE"],
            "--upstream-key-env: NOT_SET_HERE is not set (in the environment or .env)",
        ),
    ],
)
def test_dev_says_what_is_wrong_with_its_flags_in_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    env = {k: v for k, v in clean_env().items() if k != "NOT_SET_HERE"}
    run = subprocess.run(
        [sys.executable, "-m", "drain_provider", "dev", "--no-serve", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"drain-provider: configuration error: {says}"]


async def test_dev_says_what_the_upstream_answered_when_the_demo_call_fails(tmp_path: Path) -> None:
    """A real upstream that cannot be reached: one line and exit 2, not a traceback."""
    code, out, err = await dev_no_serve(
        "--upstream", f"http://127.0.0.1:{free_port()}/v1", cwd=tmp_path, env=clean_env()
    )
    assert code == 2, out + err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "drain-provider: configuration error: the demo paid call to gpt-4o-mini failed: 502 upstream_error:"
        )
    )
    assert "Traceback" not in err
