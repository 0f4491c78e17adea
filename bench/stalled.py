"""Stalled connections against `python -m drain_provider`: descriptors and RSS held, and whether
a new client is still served.

    python -m bench.stalled [--connections 500] [--kind head|body] [--checkout DIR] [--env K=V ...]

`head` connections send a request line and one header, then nothing (slowloris); `body`
connections send a whole head with `Content-Length: 100` and one byte of body. The server runs
from `--checkout` (default: this one), with the chain and the upstream unreachable (neither is
needed to hold connections). Prints one JSON object: open descriptors and RSS of the server
before, with the connections open, and after `HEADER_TIMEOUT` + 2 s; how many of the
connections the server closed by then; whether a fresh GET /v1/models was served while they
were open, and after; and how many ERROR lines the server logged. The server starts with a soft
open-files limit of 1024 (`--server-fd-limit`), as most distributions give a process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STALLS = {
    "head": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
    "body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample(pid: int) -> dict[str, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"fds": fds, "rss_mb": rss_kb // 1024}


def served(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--kind", choices=sorted(STALLS), default="head")
    parser.add_argument("--checkout", type=Path, default=REPO)
    parser.add_argument("--header-timeout", type=float, default=15.0, help="what the server is assumed to use")
    parser.add_argument("--env", action="append", default=[], help="K=V for the server, e.g. MAX_CONNECTIONS=200")
    parser.add_argument("--server-fd-limit", type=int, default=1024, help="the server's soft RLIMIT_NOFILE at start")
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this side holds every connection

    def server_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.server_fd_limit, hard), hard))

    port = free_port()
    workdir = tempfile.mkdtemp(prefix="stalled-")
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(args.checkout),
        "PROVIDER_PRIVATE_KEY": "0x" + "11" * 32,
        "CHAIN_ID": "31337",
        "DRAIN_CONTRACT": "0x" + "ab" * 20,
        "RPC_URL": f"http://127.0.0.1:{free_port()}",
        "UPSTREAM_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "DATABASE_PATH": f"{workdir}/drain.db",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "ERROR",
        **dict(item.split("=", 1) for item in args.env),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "drain_provider"],
        env=env,
        cwd=workdir,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=server_fd_limit,
    )
    try:
        deadline = time.monotonic() + 60
        while not served(port):
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        report: dict[str, object] = {"kind": args.kind, "connections": args.connections, "before": sample(server.pid)}
        socks = []
        for _ in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", port))
            with contextlib.suppress(OSError):  # closed at once by a server over its cap
                sock.sendall(STALLS[args.kind])
            socks.append(sock)
        time.sleep(1)
        report["stalled"] = sample(server.pid)
        report["new_client_served_while_stalled"] = served(port)
        time.sleep(args.header_timeout + 1)
        report[f"after_{args.header_timeout + 2:g}s"] = sample(server.pid)
        report["closed_by_server"] = sum(closed_by_server(sock) for sock in socks)
        report["new_client_served_after"] = served(port)
        for sock in socks:
            sock.close()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    report["server_error_lines"] = sum(" level=ERROR " in line for line in stderr.splitlines())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
