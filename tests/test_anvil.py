"""The JSON-RPC path, against a real anvil node: `dev --rpc-url`, and a provider that reads the
chain over HTTP only for channels it does not know yet."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eth_account import Account
from helpers import ChannelFactory, ProviderFactory, RpcProxy, free_port, paid_chat, refused_chat, wait_for

from drain_provider.chain import ChainClient
from drain_provider.devtools.devchain import DevChain
from drain_provider.protocol import Voucher


def test_dev_mode_on_an_external_node(anvil_url: str, tmp_path: Path) -> None:
    """`dev --rpc-url URL --no-serve`: the contracts deployed on that node, one paid call, and a
    banner that says which node it used and what outlives dev."""
    port = free_port()
    run = subprocess.run(
        [sys.executable, "-m", "drain_provider", "dev", "--rpc-url", anvil_url, "--port", str(port), "--no-serve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    # It names the node it used, claims no embedded chain, and says the node goes on without it.
    assert f"chain      {anvil_url} (the dev node of --rpc-url), chain id 31337" in run.stdout
    assert "embedded" not in run.stdout and "Press Ctrl-C" not in run.stdout
    assert f"is stopped, while the node at {anvil_url} and its channels go on." in run.stdout
    facts = json.loads((tmp_path / "data" / "dev.json").read_text())
    assert facts["rpcUrl"] == anvil_url and facts["chainId"] == 31337
    assert facts["lastNonce"] == "1"


async def test_known_channels_cost_no_rpc_call(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    chain_client = ChainClient.over_http(rpc_proxy.url, anvil_chain.contract)
    provider = await provider_factory(chain_client=chain_client, on=anvil_chain, chain_poll_interval=3600)
    await wait_for(lambda: provider.watcher.last_poll_at is not None)  # its first poll, then none for an hour
    consumer = await open_channel(provider, on=anvil_chain)
    client = provider.client()
    started = len(rpc_proxy.calls)
    await paid_chat(client, consumer)
    assert rpc_proxy.calls[started:] == ["eth_call"], rpc_proxy.calls  # one getChannel
    first = list(rpc_proxy.calls)
    for _ in range(5):
        await paid_chat(client, consumer)
    assert rpc_proxy.calls == first
    second = await open_channel(provider, on=anvil_chain)
    await paid_chat(client, second)
    assert rpc_proxy.calls[len(first) :] == ["eth_call"]  # the chain id is cached by now
    # The voucher the provider accepted over HTTP is claimable on anvil.
    amount, nonce, signature = await provider.ledger.fetchone(
        "SELECT amount, nonce, signature FROM vouchers WHERE channel_id = ? ORDER BY id DESC LIMIT 1",
        (consumer.channel_id,),
    ) or (0, "0", "")
    result = await anvil_chain.client().claim(
        Account.from_key(provider.settings.provider_private_key),
        Voucher(consumer.channel_id, amount, int(nonce), bytes.fromhex(signature[2:])),
    )
    assert result.succeeded
    assert await anvil_chain.usdc_balance(provider.address) == amount


async def test_rpc_down_for_a_new_channel_is_503(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(
        chain_client=ChainClient.over_http(rpc_proxy.url, anvil_chain.contract), on=anvil_chain
    )
    consumer = await open_channel(provider, on=anvil_chain)
    rpc_proxy.fail_next = 1
    error = await refused_chat(provider.client(), consumer)
    assert error.status_code == 503
    assert error.response.headers["X-DRAIN-Error"] == "chain_unavailable"
    # The RPC is back: the same voucher... is a new request with the next nonce, and works.
    raw = await paid_chat(provider.client(), consumer)
    assert int(raw.headers["X-DRAIN-Cost"]) > 0


@pytest.mark.parametrize("problem", ["chain_id", "port", "ledger", "contract"])
async def test_a_start_up_error_is_one_line_and_exit_code_2(
    anvil_chain: DevChain, tmp_path: Path, problem: str
) -> None:
    """Whatever fails while starting: one line, exit 2, nothing left running; and a start refused
    for its chain or contract has not made a ledger bound to them (the operator's next start,
    with the setting fixed, would be refused for that ledger)."""
    ledger = tmp_path / "drain.db"
    key = Account.create()
    await anvil_chain.fund(key.address)  # or the first poll logs, rightly, that it has no gas
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.environ["PYTHONPATH"],  # this checkout
        "PROVIDER_PRIVATE_KEY": "0x" + bytes(key.key).hex(),
        "CHAIN_ID": "31337",
        "DRAIN_CONTRACT": anvil_chain.contract,
        "RPC_URL": anvil_chain.rpc_url or "",
        "UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "DATABASE_PATH": str(ledger),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "LOG_LEVEL": "ERROR",
    }
    with socket.socket() as busy:
        if problem == "chain_id":
            env["CHAIN_ID"] = "80002"  # the RPC serves 31337
        elif problem == "port":
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            env["PORT"] = str(busy.getsockname()[1])
        elif problem == "contract":
            env["DRAIN_CONTRACT"] = "0x" + "ab" * 20  # nothing deployed there
        else:  # a ledger made for another contract
            other = await anvil_chain.fresh_contract()
            first = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "drain_provider", "status"],
                env={**env, "DRAIN_CONTRACT": other.contract}, cwd=tmp_path, capture_output=True, timeout=60,
            )  # fmt: skip
            assert first.returncode == 0, first.stderr
        started = time.monotonic()
        run = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "drain_provider"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("drain-provider: configuration error: ")
    assert {"chain_id": "CHAIN_ID", "port": "PORT", "ledger": "DATABASE_PATH", "contract": "DRAIN_CONTRACT"}[
        problem
    ] in line
    if problem in ("chain_id", "contract"):  # fixed, the next command is served by that ledger
        fixed = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "drain_provider", "status"],
            env={**env, "CHAIN_ID": "31337", "DRAIN_CONTRACT": anvil_chain.contract}, cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert fixed.returncode == 0, fixed.stderr
    if problem == "contract":  # found at start, not as a 503 "RPC unavailable" on every new channel
        assert "no contract at its address on chain 31337" in line and "0x" + "ab" * 20 not in line.lower()
        assert time.monotonic() - started < 20  # no RPC timeout waited for (mostly Python's start-up, under load)
