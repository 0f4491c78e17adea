"""README's "Go live on Amoy (testnet)", run as written: every command of its marked bash blocks,
in order, in bash, in an empty directory, against a replica of Amoy (anvil with chain id 80002,
our contracts and a USDC-like token at Amoy's official addresses; conftest's `amoy`).

The commands come from README.md itself, so the guide and this test cannot drift: each block is
preceded by `<!-- amoy-guide: STEP -->`, and the steps must be exactly STEPS. Only what must be is
changed, all through the environment, which wins over `.env` as it does for an operator: RPC_URL
(the replica, not the public Amoy RPC: this machine is offline), UPSTREAM_BASE_URL and
OPENAI_API_KEY (the demo upstream), PAYOUT_ADDRESS (a fresh address) and PORT (a free port; the
one text substitution is the provider URL's port in the consumer's command). The faucets are
stood in for by funding the two addresses on the replica. Outcomes are checked after each step:
the keystore 0600, doctor's exit 0, the channel open on chain, the paid call charged in the
ledger, the claim paid to the provider, the withdrawal received at PAYOUT_ADDRESS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from eth_account import Account
from helpers import REPO, USDC, Upstream, free_port

from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import DEPLOYMENTS

AMOY = DEPLOYMENTS[80002]
STEPS = ["keygen", "env", "consumer-key", "doctor", "serve", "open", "chat", "claim", "withdraw"]
MARKER = re.compile(r"<!-- amoy-guide: ([a-z-]+) -->\n```bash\n(.*?)```", re.DOTALL)
README_PORT = "127.0.0.1:3000"


def guide_steps() -> list[tuple[str, str]]:
    """The section's marked blocks, in order; every bash block of the section is marked."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Go live on Amoy (testnet)")
    section = readme[start : readme.index("\n## ", start + 1)]
    steps = MARKER.findall(section)
    assert section.count("```bash") == len(steps), "a bash block of the guide is not marked, so not tested"
    return steps


def test_the_guide_has_every_step() -> None:
    assert [name for name, _ in guide_steps()] == STEPS
    text = dict(guide_steps())
    assert "RPC_URL=https://rpc-amoy.polygon.technology" in text["env"] and "CHAIN_ID=80002" in text["env"]
    assert README_PORT in text["open"]


async def bash(script: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "bash", "-e", "-c", script, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serving(script: str, cwd: Path, env: dict[str, str]) -> AsyncIterator[None]:
    """The serve step, run as a second terminal would: until `listening`, then in the background;
    stopped (SIGTERM to its own process group) when the guide is done."""
    proc = await asyncio.create_subprocess_exec(
        "bash", "-e", "-c", script, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any("listening url=" in line for line in seen):
                line = (await proc.stderr.readline()).decode()
                assert line, f"the provider stopped: {''.join(seen)}"
                seen.append(line)
        drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling
        yield
        drain.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()


async def ledger_sum(cwd: Path, column: str) -> int:
    """A column of the ledger's channels, summed, once every request has settled (a stream's
    settles just after its last byte)."""
    conn = sqlite3.connect(f"file:{cwd / 'data' / 'drain.db'}?mode=ro", uri=True)
    try:
        async with asyncio.timeout(5):
            while conn.execute("SELECT COUNT(*) FROM usage WHERE status = 'reserved'").fetchone()[0]:
                await asyncio.sleep(0.02)
        return int(conn.execute(f"SELECT COALESCE(SUM({column}), 0) FROM channels").fetchone()[0])
    finally:
        conn.close()


async def test_the_amoy_guide_runs_as_written(
    amoy: DevChain, amoy_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    payout = str(Account.create().address)
    port = free_port()
    base = {k: os.environ[k] for k in ("HOME", "LANG", "PYTHONPATH", "SYSTEMROOT") if k in os.environ}
    env = {
        **base,
        # `python` is this interpreter, as in an activated virtual environment
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "RPC_URL": amoy_url,
        "UPSTREAM_BASE_URL": upstream.url,
        "OPENAI_API_KEY": "sk-local-demo-upstream",
        "PAYOUT_ADDRESS": payout,
        "PORT": str(port),
    }
    results: dict[str, tuple[int, str, str]] = {}
    provider = consumer = ""
    async with contextlib.AsyncExitStack() as stack:
        for name, script in guide_steps():
            script = script.replace(README_PORT, f"127.0.0.1:{port}")
            if name == "serve":
                await stack.enter_async_context(serving(script, tmp_path, env))
                continue
            code, out, err = results[name] = await bash(script, tmp_path, env)
            assert code == 0, (name, out, err)

            if name == "keygen":
                keystore = tmp_path / "data" / "provider-keystore.json"
                assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
                assert stat.S_IMODE((tmp_path / "data" / "keystore-password").stat().st_mode) == 0o600
                provider = "0x" + json.loads(keystore.read_text())["address"]
                assert provider.lower()[2:] in err.lower()
            elif name == "consumer-key":
                consumer = out.strip().splitlines()[-1]
                assert consumer == Account.from_key((tmp_path / "consumer.key").read_text().strip()).address
                # The faucets: test POL to both, test USDC to the consumer.
                await amoy.fund(provider)
                await amoy.fund(consumer, usdc=5 * USDC)
            elif name == "doctor":
                assert " failed" not in out.strip().splitlines()[-1]
            elif name == "open":
                channel_id = out.strip().splitlines()[-1]
                state = await amoy.client().get_channel(channel_id)
                assert state.deposit == 1 * USDC and state.provider.lower() == provider.lower()
                assert state.consumer == consumer
            elif name == "chat":
                assert "cost " in out
                charged = await ledger_sum(tmp_path, "charged")
                assert charged > 0
            elif name == "claim":
                claimed = (await amoy.client().get_channel(channel_id)).claimed
                assert claimed >= charged  # the smallest voucher that covers the charge
                received = await amoy.usdc_balance(provider)
                assert received == claimed - await ledger_sum(tmp_path, "fee")  # V2's protocol fee, if any
            elif name == "withdraw":
                assert await amoy.usdc_balance(payout) == received
                assert await amoy.usdc_balance(provider) == 0
    assert set(results) == set(STEPS) - {"serve"}
