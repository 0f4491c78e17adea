"""`python -m drain_provider dev` as a newcomer runs it: start, read data/dev.json, run the printed
openai SDK snippet against it from another process, stop with Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import free_port

DEV_KEYS = {
    "api",
    "chainId",
    "rpcUrl",
    "contract",
    "token",
    "provider",
    "consumer",
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
        lines: list[str] = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while not any(line.startswith("Press Ctrl-C") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        banner = "".join(lines)
        ready = re.search(r"ready in ([0-9.]+) s", banner)
        assert ready, banner
        assert "cost " in banner and "Traceback" not in banner

        facts = json.loads((tmp_path / "data" / "dev.json").read_text())
        assert set(facts) == DEV_KEYS
        assert facts["api"] == f"http://127.0.0.1:{port}/v1"
        assert facts["rpcUrl"] is None and facts["lastNonce"] == "1"
        assert int(facts["lastAmount"]) > 0 and int(facts["deposit"]) == 10_000_000

        # The snippet the banner prints, run as printed, twice (the nonce must carry over).
        snippet = banner[banner.index("python - <<'EOF'") : banner.index("  EOF")].split("\n", 1)[1]
        code = "\n".join(line[2:] for line in snippet.splitlines())
        for expected_nonce in ("2", "3"):
            run = subprocess.run(
                [sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60
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
