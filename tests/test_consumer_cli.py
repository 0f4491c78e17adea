"""The consumer kit's CLI, as a person runs it: `open` and `chat` against a real provider whose
chain is a real anvil node over JSON-RPC (the CLI's own web3, no ChainClient), the key from a
file or the environment and never shown, the channel's state carried from one command to the
next in a private file; a lost state recovered from the provider, `status`, and a cooperative `close`."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from eth_account import Account
from helpers import USDC, Provider, ProviderFactory

from drain_provider.consumer.cli import main
from drain_provider.consumer.discovery import DiscoveryError, parse_usdc
from drain_provider.devtools.devchain import DevChain


def run_cli(*argv: str) -> int:
    return main(list(argv))


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main() in a thread (it runs its own event loop; the provider serves on this one)."""
    code = await asyncio.to_thread(run_cli, *argv)
    out, err = capsys.readouterr()
    return code, out, err


async def usage_costs(provider: Provider, channel_id: str) -> list[int]:
    rows = await provider.ledger.fetchall("SELECT cost FROM usage WHERE channel_id = ? ORDER BY id", (channel_id,))
    return [int(r[0]) for r in rows]


async def test_open_and_chat_against_a_provider_on_anvil(
    anvil_url: str,
    anvil_chain: DevChain,
    provider_factory: ProviderFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider = await provider_factory(on=anvil_chain)
    key = Account.create()
    await anvil_chain.fund(key.address, usdc=5 * USDC)
    key_file = tmp_path / "consumer.key"
    key_file.write_text("0x" + bytes(key.key).hex() + "\n")
    state = tmp_path / "channel.json"
    common = ["--rpc-url", anvil_url, "--state", str(state), "--key-file", str(key_file)]
    root = str(provider.server.make_url(""))  # the provider's URL as a person has it, without /v1

    code, out, err = await cli(capsys, "open", "--provider", root, "--deposit", "2.5", "--duration", "7200", *common)
    assert code == 0, err
    channel_id = out.strip()
    assert len(channel_id) == 66
    on_chain = await anvil_chain.client().get_channel(channel_id)
    assert on_chain.consumer == key.address and on_chain.provider == provider.address
    assert on_chain.deposit == 2_500_000
    facts = json.loads(state.read_text())
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    assert facts["channelId"] == channel_id and facts["contract"] == anvil_chain.contract
    assert facts["chainId"] == 31337 and facts["api"] == provider.url and facts["lastNonce"] == "0"

    for turn in (1, 2):
        code, out, err = await cli(capsys, "chat", "Hello", "from", "the", "CLI", "--model", "demo", *common)
        assert code == 0, err
        text, figures = out.rstrip("\n").rsplit("\n", 1)
        assert "demo model" in text
        costs = await usage_costs(provider, channel_id)
        assert len(costs) == turn
        assert figures == f"cost {costs[-1]} total {sum(costs)} remaining {2_500_000 - sum(costs)} (base units)"
        assert json.loads(state.read_text())["lastNonce"] == str(turn)
        assert json.loads(state.read_text())["charged"] == str(sum(costs))
    secret = bytes(key.key).hex()
    assert secret not in state.read_text() and secret not in out + err

    # One open channel per state file.
    code, _, err = await cli(capsys, "open", "--provider", root, "--deposit", "1", *common)
    assert code == 2 and "holds the open channel" in err


def test_the_key_is_required_and_never_quoted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_key = os.environ.pop("CONSUMER_PRIVATE_KEY", None)
    cwd = Path.cwd()
    os.chdir(tmp_path)  # no .env here
    try:
        assert run_cli("chat", "hi") == 2
        assert "set CONSUMER_PRIVATE_KEY" in capsys.readouterr().err
        bad = tmp_path / "bad.key"
        bad.write_text("0xnot-a-key-but-a-secret-anyway")
        assert run_cli("chat", "hi", "--key-file", str(bad)) == 2
        err = capsys.readouterr().err
        assert "--key-file is not a private key" in err and "secret" not in err
        good = tmp_path / "good.key"
        good.write_text(Account.create().key.hex())
        assert run_cli("chat", "hi", "--key-file", str(good), "--state", str(tmp_path / "none.json")) == 2
        assert "run `open` first, or pass --channel ID --provider URL" in capsys.readouterr().err
    finally:
        os.chdir(cwd)
        if env_key is not None:
            os.environ["CONSUMER_PRIVATE_KEY"] = env_key


async def test_the_module_runs_as_a_command(tmp_path: Path) -> None:
    """`python -m drain_provider.consumer` and `python -m drain_provider consumer` are the same CLI."""
    for argv in (["-m", "drain_provider.consumer", "--help"], ["-m", "drain_provider", "consumer", "chat", "--help"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"open" in out or b"--max-tokens" in out


@pytest.mark.parametrize(
    ("text", "base_units"), [("0.0075", 7500), ("10", 10_000_000), ("0.000001", 1), (" 2.5 ", 2_500_000)]
)
def test_usdc_amounts_are_read_exactly(text: str, base_units: int) -> None:
    assert parse_usdc(text) == base_units


@pytest.mark.parametrize("text", ["0.0000001", "1e3", "-1", "", "1,5", "0x10", "nan"])
def test_anything_else_is_not_an_amount(text: str) -> None:
    with pytest.raises(DiscoveryError):
        parse_usdc(text)


def test_a_deposit_that_is_not_an_amount_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    key.write_text(Account.create().key.hex())
    state = str(tmp_path / "s.json")
    code = run_cli(
        "open", "--provider", "http://127.0.0.1:9", "--deposit", "1e3", "--key-file", str(key), "--state", state
    )
    assert code == 2 and "not a USDC amount" in capsys.readouterr().err


async def test_a_lost_state_status_and_a_cooperative_close(
    anvil_url: str,
    anvil_chain: DevChain,
    provider_factory: ProviderFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """open, chat; the state file is lost; chat continues from the provider's channel status;
    status shows the provider's and the chain's view; close gets the refund on chain."""
    provider = await provider_factory(on=anvil_chain)
    key = Account.create()
    await anvil_chain.fund(key.address, usdc=5 * USDC)
    monkeypatch.setenv("CONSUMER_PRIVATE_KEY", "0x" + bytes(key.key).hex())  # the other way to give it
    state = tmp_path / "channel.json"
    common = ["--rpc-url", anvil_url, "--state", str(state)]
    root = str(provider.server.make_url(""))
    code, out, err = await cli(capsys, "open", "--provider", root, "--deposit", "2", "--duration", "7200", *common)
    assert code == 0, err
    channel_id = out.strip()
    assert (await cli(capsys, "chat", "first", "--model", "demo", *common))[0] == 0

    state.unlink()  # lost: only the channel id and the provider's URL are left
    resume = ["--channel", channel_id, "--provider", root]
    code, out, err = await cli(capsys, "chat", "second", "--model", "demo", *common, *resume)
    assert code == 0, err
    costs = await usage_costs(provider, channel_id)
    assert len(costs) == 2 and out.rstrip().endswith(
        f"total {sum(costs)} remaining {2 * USDC - sum(costs)} (base units)"
    )
    assert json.loads(state.read_text())["lastNonce"] == "2"

    code, out, err = await cli(capsys, "status", *common)
    assert code == 0, err
    report = json.loads(out)
    assert report["provider"]["status"] == "open" and report["provider"]["charged"] == str(sum(costs))
    assert report["chain"] == {
        "open": True,
        "deposit": str(2 * USDC),
        "claimed": "0",
        "expiry": report["chain"]["expiry"],
        "expired": False,
    }

    balance = await anvil_chain.usdc_balance(key.address)
    code, out, err = await cli(capsys, "close", *common)
    assert code == 0, err
    refund = 2 * USDC - sum(costs)
    assert out.strip().startswith(f"refund {refund} (base units")
    assert await anvil_chain.usdc_balance(key.address) - balance == refund
    assert not (await anvil_chain.client().get_channel(channel_id)).exists
    assert json.loads(state.read_text())["status"] == "closed"
