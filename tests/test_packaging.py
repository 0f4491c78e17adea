"""The ways to run a provider for real: the Dockerfile, compose.yaml, the systemd unit and the
reverse proxy examples of contrib/, checked against the code they run.

- The systemd units (the server; the daily backup and its timer) pass `systemd-analyze verify`
  without a warning; the server's unit agrees with the server: a stop timeout above its
  graceful shutdown, descriptors for MAX_CONNECTIONS.
- The Dockerfile, read as Docker reads it: non-root numeric user, the ledger on the /data volume,
  the entry point, a HEALTHCHECK that compiles, and only files that exist and are not ignored
  are copied. Its HEALTHCHECK command is run for real, against a provider and a closed port.
  (The image itself is built and smoke-tested by .ci/docker-smoke, where a Docker engine runs.)
- compose.yaml runs that image: its volume, .env, a port bound to loopback, trusted proxies.
- The nginx and Caddy examples are served for real in front of a provider: the API passes, the
  admin API and /metrics do not, however the path is spelled.

systemd-analyze, nginx and caddy are installed by .ci/run where they are missing: in CI (CI set)
these tests fail without them rather than skip.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from helpers import REPO, Provider, free_port

from drain_provider.api import RUNNER_OPTIONS
from drain_provider.config import SETTINGS
from drain_provider.process import THREAD_GRACE
from drain_provider.server import FDS_PER_CONNECTION, FDS_RESERVED

UNIT = REPO / "contrib" / "drain-provider.service"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
VENV_PYTHON = "/opt/drain-provider/.venv/bin/python"  # where README's install steps put it


def need(tool: str) -> str:
    """The tool's path; outside CI a machine without it skips the test, in CI it fails."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run installs it with apt-get")
        pytest.skip(f"{tool} is not installed (apt-get install systemd nginx caddy)")
    return path


def default(name: str) -> str:
    (setting,) = (s for s in SETTINGS if s.name == name)
    assert setting.default is not None
    return setting.default


# --- systemd --------------------------------------------------------------------------------


def unit_values() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", text)
    assert match, text
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the units as shipped (the server, the daily backup and its
    timer), but for their python (ExecStart's must exist): the current interpreter stands in for
    the one README's steps install."""
    analyze = need("systemd-analyze")
    assert f"ExecStart={VENV_PYTHON} -m drain_provider\n" in UNIT.read_text()
    units = sorted(path for path in (REPO / "contrib").glob("drain-provider*") if path.suffix in (".service", ".timer"))
    assert {unit.name for unit in units} >= {UNIT.name, "drain-provider-backup.service", "drain-provider-backup.timer"}
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace(VENV_PYTHON, sys.executable))
    run = subprocess.run(
        [analyze, "verify", *(str(tmp_path / unit.name) for unit in units)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values, but prints them: no output is the pass.
    assert run.returncode == 0 and (run.stdout + run.stderr).strip() == "", run.stdout + run.stderr
    backup = (REPO / "contrib" / "drain-provider-backup.service").read_text()
    assert f"{VENV_PYTHON} -m drain_provider backup --out " in backup


def test_the_systemd_unit_agrees_with_the_server() -> None:
    unit = unit_values()
    assert unit["Type"] == ["simple"]  # the server does not speak sd_notify
    assert unit["RestartPreventExitStatus"] == ["2"]  # a configuration error: a restart cannot fix it
    assert unit["Restart"] == ["on-failure"] and unit["KillSignal"] == ["SIGTERM"]
    graceful = float(RUNNER_OPTIONS["shutdown_timeout"]) + THREAD_GRACE
    assert seconds(unit["TimeoutStopSec"][0]) >= graceful + 10
    needed = int(default("MAX_CONNECTIONS")) * FDS_PER_CONNECTION + FDS_RESERVED
    assert int(unit["LimitNOFILE"][0]) >= needed
    state = "/var/lib/drain-provider"
    assert unit["ReadWritePaths"] == [state] and unit["WorkingDirectory"] == [state]
    assert f"DATABASE_PATH={state}/drain.db" in unit["Environment"]
    assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["EnvironmentFile"] == ["/etc/drain-provider/env"]


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def only(word: str, stage: list[tuple[str, str]]) -> str:
    (value,) = (rest for w, rest in stage if w == word)
    return value


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            values.update(part.split("=", 1) for part in shlex.split(rest))  # type: ignore[misc]
    return values


def healthcheck_command() -> list[str]:
    rest = only("HEALTHCHECK", final_stage())
    command = json.loads(rest[rest.index("CMD") + len("CMD") :].strip())
    assert isinstance(command, list) and command[:2] == ["python", "-c"] and len(command) == 3
    return [str(part) for part in command]


def test_the_image_runs_the_server_as_a_user_with_its_ledger_on_a_volume() -> None:
    stage = final_stage()
    user = only("USER", stage).split(":")
    assert all(part.isdigit() and int(part) >= 1000 for part in user), user  # numeric: runAsNonRoot can check it
    assert only("VOLUME", stage) in ("/data", '["/data"]')
    assert env_values(stage)["DATABASE_PATH"] == "/data/drain.db"
    assert json.loads(only("ENTRYPOINT", stage)) == ["python", "-m", "drain_provider"]
    assert only("EXPOSE", stage) == default("PORT")
    assert only("STOPSIGNAL", stage) == "SIGTERM"
    assert only("WORKDIR", stage) != "/data"  # cwd's .env is read as settings: not on the volume
    assert "10001" in only("RUN", stage)  # the user exists, and owns /data
    ast.parse(healthcheck_command()[2])  # valid Python


def test_the_image_copies_files_that_exist_and_are_not_ignored() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".env", "data", ".git", ".venv", "node_modules"} <= ignored
    copied = []
    for word, rest in dockerfile():
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = shlex.split(rest)
            copied += sources
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") not in ignored, source


async def healthcheck(port: int) -> int:
    command = healthcheck_command()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *command[1:], env={**os.environ, "PORT": str(port)}, stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_the_healthcheck_passes_on_a_provider_and_fails_on_a_closed_port(provider: Provider) -> None:
    assert provider.server.port is not None
    assert await healthcheck(provider.server.port) == 0
    assert await healthcheck(free_port()) != 0


# --- compose.yaml -----------------------------------------------------------------------------


def test_compose_runs_the_image_with_its_ledger_on_a_volume_behind_a_proxy() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["provider"]
    assert service["build"] == "." and service["env_file"] == ".env"
    assert "entrypoint" not in service and "command" not in service  # the Dockerfile's ENTRYPOINT
    volume, _, target = service["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]
    environment = service["environment"]
    assert environment["DATABASE_PATH"] == env_values(final_stage())["DATABASE_PATH"]
    assert str(environment["PORT"]) == only("EXPOSE", final_stage())
    assert service["ports"] and all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert seconds(service["stop_grace_period"]) > float(RUNNER_OPTIONS["shutdown_timeout"]) + THREAD_GRACE
    # A proxy on the host comes in through the network's gateway: X-Forwarded-For from it is trusted.
    (subnet,) = (ipaddress.ip_network(c["subnet"]) for c in compose["networks"]["default"]["ipam"]["config"])
    trusted = [ipaddress.ip_network(part.strip()) for part in environment["TRUSTED_PROXIES"].split(",")]
    assert any(subnet.subnet_of(network) for network in trusted)  # type: ignore[arg-type]
    text = COMPOSE.read_text()
    assert "PROVIDER_KEYSTORE: /run/secrets/" in text and "PROVIDER_KEYSTORE_PASSWORD_FILE: /run/secrets/" in text


# --- the reverse proxies ----------------------------------------------------------------------

BLOCKED = [
    "/v1/admin/stats",
    "/v1/admin",
    "//v1/admin/stats",
    "/v1//admin/stats",
    "/v1/%61dmin/stats",
    "/v1/./admin/stats",
    "/v1/x/../admin/stats",
    "/metrics",
]


async def run_tool(*command: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@contextlib.asynccontextmanager
async def serving(command: list[str], port: int, env: dict[str, str] | None = None) -> AsyncIterator[None]:
    """`command` running until the block ends, once it accepts connections on `port`."""
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                assert proc.returncode is None and time.monotonic() < deadline, "the proxy did not start"
                await asyncio.sleep(0.05)
        yield
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def check_proxy(base: str, provider: Provider) -> None:
    """Through the proxy: the API answers as the provider does; the admin API (which the
    provider would answer 403 or 401) and /metrics are refused by the proxy, however spelled."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/models") as resp:
            assert resp.status == 200
            models = await resp.json()
        async with session.get(f"{provider.url}/models") as direct:
            assert models == await direct.json()
        async with session.get(f"{provider.url}/admin/stats") as direct:
            assert direct.status in (401, 403)  # what the proxy must not let through
        for path in BLOCKED:
            async with session.get(base + path, headers={"Authorization": "Bearer x"}) as resp:
                assert resp.status == 404, path
                assert "X-DRAIN-Error" not in resp.headers, path


async def test_the_nginx_example_passes_the_api_and_keeps_the_admin_api_in(provider: Provider, tmp_path: Path) -> None:
    """contrib/nginx.conf as shipped but for its ports, its certificate and the provider's
    address (TLS is nginx's own business)."""
    nginx = need("nginx")
    port = free_port()
    site = (REPO / "contrib" / "nginx.conf").read_text()
    site = site.replace("server 127.0.0.1:3000;", f"server 127.0.0.1:{provider.server.port};")
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port};").replace("listen [::]:443 ssl http2;", "")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{free_port()};").replace("listen [::]:80;", "")
    site = re.sub(r"\n\s*ssl_certificate.*", "", site)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;\n"
        "events {}\n"
        f"http {{ access_log off; client_body_temp_path {tmp_path}; proxy_temp_path {tmp_path}; "
        f"include {tmp_path}/site.conf; }}\n"
    )
    command = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    code, out = await run_tool(*command, "-t")
    assert code == 0, out
    async with serving(command, port):
        await check_proxy(f"http://127.0.0.1:{port}", provider)


async def test_the_caddy_example_passes_the_api_and_keeps_the_admin_api_in(provider: Provider, tmp_path: Path) -> None:
    """contrib/Caddyfile as shipped, validated, then served over plain HTTP on a free port
    (no certificate to get), with its admin endpoint off (tests run side by side)."""
    caddy = need("caddy")
    shipped = REPO / "contrib" / "Caddyfile"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "HOME": str(tmp_path)}
    code, out = await run_tool(caddy, "validate", "--adapter", "caddyfile", "--config", str(shipped), env=env)
    assert code == 0, out
    port = free_port()
    site = shipped.read_text().replace("llm.example.com {", f"http://127.0.0.1:{port} {{")
    (tmp_path / "Caddyfile").write_text("{\n\tadmin off\n}\n\n" + site)
    env["DRAIN_PROVIDER"] = f"127.0.0.1:{provider.server.port}"
    async with serving([caddy, "run", "--adapter", "caddyfile", "--config", str(tmp_path / "Caddyfile")], port, env):
        await check_proxy(f"http://127.0.0.1:{port}", provider)
