"""`dev --anvil`: a real JSON-RPC dev node for clients outside this process (viem, the MCP
server, the consumer kit), since the embedded chain has none. It runs the anvil that `npm
install` puts in node_modules/.bin (or Foundry's on PATH), and stops it with `dev`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

CHECKOUT = Path(__file__).resolve().parents[2]  # the drain-provider checkout, for an editable install
START_TIMEOUT = 30.0


def find_anvil() -> str | None:
    """node_modules/.bin/anvil here or in the checkout, else `anvil` on PATH."""
    for root in (Path.cwd(), CHECKOUT):
        candidate = root / "node_modules" / ".bin" / "anvil"
        if candidate.exists():
            return str(candidate)
    return shutil.which("anvil")


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no use
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class Anvil:
    process: asyncio.subprocess.Process
    url: str

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def start_anvil(port: int, host: str = "127.0.0.1") -> Anvil:
    """anvil listening on host:port (chain id 31337, ten funded unlocked accounts)."""
    binary = find_anvil()
    if binary is None:
        raise ConfigError("dev --anvil: anvil not found: run `npm install` in the drain-provider checkout")
    if _port_taken(host, port):
        raise ConfigError(f"dev --anvil: port {port} is in use; choose another with --anvil-port")
    process = await asyncio.create_subprocess_exec(
        binary,
        "--host",
        host,
        "--port",
        str(port),
        "--silent",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches dev, which stops the provider first, then anvil
    )
    anvil = Anvil(process, f"http://{host}:{port}")
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT
    while not await _accepts(host, port):
        if process.returncode is not None or asyncio.get_running_loop().time() > deadline:
            await anvil.stop()
            raise ConfigError(f"dev --anvil: anvil did not start on port {port}")
        await asyncio.sleep(0.05)
    return anvil
