"""Tests for the test contracts (DrainChannel V2, DrainChannelV1, TestUSDC) on an in-process chain.

The contracts are deployed once per module from the committed JSON artifacts; every test
runs inside an eth-tester snapshot that is reverted afterwards, so tests do not see each
other's state (fees, channels, moved time).

Accounts: ``deployer`` is an eth-tester unlocked account (a plain
``transact({"from": ...})`` goes through ``eth_sendTransaction``). ``consumer``,
``provider``, ``stranger`` and ``fee_sink`` are local ``eth_account`` keys: the
``SignAndSendRawMiddlewareBuilder`` signs their transactions and sends them raw, and
they sign the EIP-712 messages.
"""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from web3.middleware import SignAndSendRawMiddlewareBuilder
from web3.testing import Testing as Web3Testing
from web3.types import EventData, TxParams, TxReceipt

from drain_provider.chain import revert_data

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "drain_provider" / "contracts" / "artifacts"
# The ABI of DRAIN's DrainChannelV2.sol (github.com/kimbo128/DRAIN, contracts/src, as of commit
# 50b3a110), compiled by solc: the interface the deployed V2 contracts have.
REAL_V2_ABI = REPO_ROOT / "tests" / "data" / "DrainChannelV2.abi.json"
# The same for DRAIN's V1, contracts/src/DrainChannel.sol at that commit (solc 0.8.28, its imports
# of interfaces/IERC20.sol and OpenZeppelin's ECDSA.sol from the same tree).
REAL_V1_ABI = REPO_ROOT / "tests" / "data" / "DrainChannelV1.abi.json"
COMPILE_JS = REPO_ROOT / "drain_provider" / "contracts" / "compile.js"

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
ZERO_ADDRESS = "0x" + "00" * 20
ONE_USDC = 10**6
DEPOSIT = 10 * ONE_USDC
DURATION = 3600

VOUCHER_TYPES = {
    "Voucher": [
        {"name": "channelId", "type": "bytes32"},
        {"name": "amount", "type": "uint256"},
        {"name": "nonce", "type": "uint256"},
    ]
}
CLOSE_TYPES = {
    "CloseAuthorization": [
        {"name": "channelId", "type": "bytes32"},
        {"name": "finalAmount", "type": "uint256"},
    ]
}


# ---------------------------------------------------------------------------- helpers


def load_artifact(name: str) -> dict[str, Any]:
    artifact: dict[str, Any] = json.loads((ARTIFACTS / f"{name}.json").read_text())
    return artifact


def selector(error_signature: str) -> bytes:
    """4-byte selector of a custom error, e.g. ``selector("NotOwner()")``."""
    return bytes(Web3.keccak(text=error_signature)[:4])


def assert_reverts(fn: ContractFunction, sender: str, error: str) -> None:
    """Sending ``fn`` from ``sender`` reverts with parameterless custom ``error``."""
    with pytest.raises((ContractCustomError, TransactionFailed)) as info:
        fn.transact({"from": sender})
    assert revert_data(info.value) == selector(f"{error}()")


def events(contract: Contract, name: str, receipt: TxReceipt) -> tuple[EventData, ...]:
    """Decoded ``name`` events of ``contract`` in ``receipt`` (other logs skipped)."""
    decoded: tuple[EventData, ...] = getattr(contract.events, name)().process_receipt(receipt, errors=DISCARD)
    return decoded


def send(w3: Web3, fn: ContractFunction, sender: str) -> TxReceipt:
    receipt = w3.eth.wait_for_transaction_receipt(fn.transact({"from": sender}))
    assert receipt["status"] == 1
    return receipt


def domain(chain_id: int, verifying_contract: str) -> dict[str, Any]:
    return {
        "name": "DrainChannel",
        "version": "1",
        "chainId": chain_id,
        "verifyingContract": verifying_contract,
    }


def sign_voucher(
    account: LocalAccount,
    env: "Env",
    channel_id: bytes,
    amount: int,
    nonce: int,
    *,
    chain_id: int | None = None,
    verifying_contract: str | None = None,
) -> bytes:
    message = encode_typed_data(
        domain_data=domain(chain_id or env.chain_id, verifying_contract or env.channel.address),
        message_types=VOUCHER_TYPES,
        message_data={"channelId": channel_id, "amount": amount, "nonce": nonce},
    )
    return bytes(account.sign_message(message).signature)


def sign_close(account: LocalAccount, env: "Env", channel_id: bytes, final_amount: int) -> bytes:
    message = encode_typed_data(
        domain_data=domain(env.chain_id, env.channel.address),
        message_types=CLOSE_TYPES,
        message_data={"channelId": channel_id, "finalAmount": final_amount},
    )
    return bytes(account.sign_message(message).signature)


def split_signature(sig: bytes) -> tuple[int, int, int]:
    assert len(sig) == 65
    return int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"), sig[64]


def join_signature(r: int, s: int, v: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])


# --------------------------------------------------------------------------- fixtures


class Env:
    """Everything a test needs: the chain, the two contracts and the actors."""

    def __init__(self) -> None:
        self.w3 = Web3(EthereumTesterProvider())
        self.chain_id = self.w3.eth.chain_id
        # web3 attaches the `testing` module (timeTravel, mine, snapshot, revert) at runtime.
        self.testing: Web3Testing = self.w3.testing  # type: ignore[attr-defined]
        # An unlocked eth-tester account; deploys, so it is the owner.
        self.deployer = self.w3.eth.accounts[0]
        self.consumer = Account.create()
        self.provider = Account.create()
        self.stranger = Account.create()
        self.fee_sink = Account.create()
        locals_ = [self.consumer, self.provider, self.stranger, self.fee_sink]
        self.w3.middleware_onion.inject(SignAndSendRawMiddlewareBuilder.build(locals_), layer=0)
        for acct in locals_:
            send_eth: TxParams = {"from": self.deployer, "to": acct.address, "value": Web3.to_wei(1, "ether")}
            self.w3.eth.wait_for_transaction_receipt(self.w3.eth.send_transaction(send_eth))

        self.usdc = self._deploy("TestUSDC")
        self.channel = self._deploy("DrainChannel", self.usdc.address)
        self.channel_v1 = self._deploy("DrainChannelV1", self.usdc.address)

        send(
            self.w3,
            self.usdc.functions.mint(self.consumer.address, 100 * ONE_USDC),
            self.deployer,
        )
        for spender in (self.channel, self.channel_v1):
            send(self.w3, self.usdc.functions.approve(spender.address, 2**256 - 1), self.consumer.address)

    def _deploy(self, name: str, *args: Any) -> Contract:
        artifact = load_artifact(name)
        factory = self.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        receipt = self.w3.eth.wait_for_transaction_receipt(factory.constructor(*args).transact({"from": self.deployer}))
        assert receipt["status"] == 1
        contract = self.w3.eth.contract(address=receipt["contractAddress"], abi=artifact["abi"])
        assert isinstance(contract, Contract)
        return contract

    def balance(self, who: str | LocalAccount) -> int:
        address = who if isinstance(who, str) else who.address
        return int(self.usdc.functions.balanceOf(address).call())

    def open(self, amount: int = DEPOSIT, duration: int = DURATION) -> tuple[bytes, TxReceipt]:
        """Opens a channel consumer → provider and returns (channelId, receipt)."""
        fn = self.channel.functions.open(self.provider.address, amount, duration)
        receipt = send(self.w3, fn, self.consumer.address)
        (event,) = events(self.channel, "ChannelOpened", receipt)
        return bytes(event["args"]["channelId"]), receipt

    def claim(self, channel_id: bytes, amount: int, nonce: int = 1, signature: bytes | None = None) -> TxReceipt:
        if signature is None:
            signature = sign_voucher(self.consumer, self, channel_id, amount, nonce)
        fn = self.channel.functions.claim(channel_id, amount, nonce, signature)
        return send(self.w3, fn, self.provider.address)

    def travel_past(self, timestamp: int) -> None:
        """Moves chain time so the next block AND 'latest' are at ``timestamp``+.

        ``testing.timeTravel`` only sets the pending block's timestamp; calls and gas
        estimates run against 'latest', so a block is mined to make it visible there.
        """
        self.testing.timeTravel(timestamp)
        self.testing.mine(1)
        assert self.w3.eth.get_block("latest")["timestamp"] >= timestamp


@pytest.fixture(scope="module")
def module_env() -> Env:
    return Env()


@pytest.fixture
def env(module_env: Env) -> Iterator[Env]:
    snapshot = module_env.testing.snapshot()
    yield module_env
    module_env.testing.revert(snapshot)


# ------------------------------------------------------------------------- artifacts


def test_artifacts_match_sources() -> None:
    result = subprocess.run(
        ["node", str(COMPILE_JS.relative_to(REPO_ROOT)), "--check"],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_artifact_format() -> None:
    for name in ("DrainChannel", "DrainChannelV1", "TestUSDC"):
        artifact = load_artifact(name)
        assert list(artifact) == ["contractName", "abi", "bytecode", "compiler"]
        assert artifact["contractName"] == name
        assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 1000
        bytes.fromhex(artifact["bytecode"][2:])
        assert artifact["compiler"]["version"].startswith("0.8.28+")
        assert artifact["compiler"]["settings"] == {
            "optimizer": {"enabled": True, "runs": 200},
            "evmVersion": "cancun",
        }
    errors = {e["name"] for e in load_artifact("DrainChannel")["abi"] if e["type"] == "error"}
    assert errors == {
        "NotOwner",
        "ZeroAddress",
        "ChannelExists",
        "ChannelNotFound",
        "NotProvider",
        "NotConsumer",
        "NotExpired",
        "InvalidSignature",
        "InvalidAmount",
        "TransferFailed",
        "FeeTooHigh",
        "NoExcess",
    }


def abi_shape(item: Any) -> Any:
    """An ABI entry without `internalType` (Solidity's own names, e.g. of the struct's contract)."""
    if isinstance(item, list):
        return [abi_shape(x) for x in item]
    if isinstance(item, dict):
        return {k: abi_shape(v) for k, v in item.items() if k != "internalType"}
    return item


@pytest.mark.parametrize(("artifact", "real_abi"), [("DrainChannel", REAL_V2_ABI), ("DrainChannelV1", REAL_V1_ABI)])
def test_abi_is_the_real_abi(artifact: str, real_abi: Path) -> None:
    """Same functions, events, errors and constructor as the deployed V2 (DrainChannel) and V1
    (DrainChannelV1), entry by entry: names, argument names, types, order, indexing and
    mutability. Nothing more, nothing less."""

    def entries(abi: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        shaped = {(item["type"], item.get("name", "")): abi_shape(item) for item in abi}
        assert len(shaped) == len(abi)  # no overloads to hide behind one key
        return shaped

    ours = entries(load_artifact(artifact)["abi"])
    real = entries(json.loads(real_abi.read_text()))
    assert sorted(ours) == sorted(real)
    for key, item in real.items():
        assert ours[key] == item, key


# ------------------------------------------------------------------------------ setup


def test_deployment_state(env: Env) -> None:
    c = env.channel.functions
    assert c.usdc().call() == env.usdc.address
    assert c.owner().call() == env.deployer
    assert c.feeBps().call() == 0
    assert c.feeRecipient().call() == ZERO_ADDRESS  # as in the real V2: no fee until setFee
    assert c.totalLocked().call() == 0
    assert c.isImmutable().call() is False
    assert c.DOMAIN_TYPEHASH().call() == Web3.keccak(
        text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    assert c.VOUCHER_TYPEHASH().call() == Web3.keccak(text="Voucher(bytes32 channelId,uint256 amount,uint256 nonce)")
    assert c.CLOSE_TYPEHASH().call() == Web3.keccak(text="CloseAuthorization(bytes32 channelId,uint256 finalAmount)")


def test_domain_separator_matches_eth_account(env: Env) -> None:
    message = encode_typed_data(
        domain_data=domain(env.chain_id, env.channel.address),
        message_types=VOUCHER_TYPES,
        message_data={"channelId": b"\x00" * 32, "amount": 0, "nonce": 0},
    )
    # SignableMessage(version=0x01, header=domain separator, body=struct hash)
    assert env.channel.functions.DOMAIN_SEPARATOR().call() == message.header
    # ...and the same value by hand, so a wrong name/version/chain shows up here too.
    by_hand = Web3.keccak(
        Web3.keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
        + Web3.keccak(text="DrainChannel")
        + Web3.keccak(text="1")
        + env.chain_id.to_bytes(32, "big")
        + bytes(12)
        + Web3.to_bytes(hexstr=env.channel.address)
    )
    assert message.header == by_hand


# ------------------------------------------------------------------------------- open


def test_open(env: Env) -> None:
    nonce_before = env.channel.functions.nonces(env.consumer.address).call()
    consumer_before = env.balance(env.consumer)

    channel_id, receipt = env.open()

    timestamp = env.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    expected_id = Web3.solidity_keccak(
        ["address", "address", "uint256", "uint256"],
        [env.consumer.address, env.provider.address, timestamp, nonce_before],
    )
    assert channel_id == expected_id
    assert env.channel.functions.nonces(env.consumer.address).call() == nonce_before + 1

    assert env.channel.functions.getChannel(channel_id).call() == (
        env.consumer.address,
        env.provider.address,
        DEPOSIT,
        0,
        timestamp + DURATION,
    )
    assert env.channel.functions.channels(channel_id).call() == [
        env.consumer.address,
        env.provider.address,
        DEPOSIT,
        0,
        timestamp + DURATION,
    ]
    assert env.channel.functions.getBalance(channel_id).call() == DEPOSIT
    assert env.channel.functions.totalLocked().call() == DEPOSIT

    assert env.balance(env.consumer) == consumer_before - DEPOSIT
    assert env.balance(env.channel.address) == DEPOSIT

    (event,) = events(env.channel, "ChannelOpened", receipt)
    assert event["args"]["channelId"] == channel_id
    assert event["args"]["consumer"] == env.consumer.address
    assert event["args"]["provider"] == env.provider.address
    assert event["args"]["deposit"] == DEPOSIT
    assert event["args"]["expiry"] == timestamp + DURATION


def test_second_open_uses_the_next_nonce(env: Env) -> None:
    # (Two opens in one block cannot be staged here: with auto-mining off, eth-tester
    # validates every queued tx against the pre-block state, so a sender's second tx is
    # rejected for its nonce.)
    first_id, _ = env.open()
    second_id, receipt = env.open(amount=ONE_USDC)
    timestamp = env.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    expected = Web3.solidity_keccak(
        ["address", "address", "uint256", "uint256"],
        [env.consumer.address, env.provider.address, timestamp, 1],
    )
    assert second_id == expected != first_id
    assert env.channel.functions.nonces(env.consumer.address).call() == 2
    assert env.channel.functions.getChannel(first_id).call()[2] == DEPOSIT
    assert env.channel.functions.getChannel(second_id).call()[2] == ONE_USDC
    assert env.channel.functions.totalLocked().call() == DEPOSIT + ONE_USDC


def test_open_reverts(env: Env) -> None:
    c = env.channel.functions
    assert_reverts(c.open(ZERO_ADDRESS, ONE_USDC, DURATION), env.consumer.address, "ZeroAddress")
    assert_reverts(c.open(env.provider.address, 0, DURATION), env.consumer.address, "InvalidAmount")
    # The stranger holds no tokens and approved nothing: the failed pull is
    # TransferFailed.
    assert_reverts(
        c.open(env.provider.address, ONE_USDC, DURATION),
        env.stranger.address,
        "TransferFailed",
    )
    # More than the consumer holds.
    assert_reverts(
        c.open(env.provider.address, 1000 * ONE_USDC, DURATION),
        env.consumer.address,
        "TransferFailed",
    )


def test_revert_is_also_a_failed_receipt_on_chain(env: Env) -> None:
    """With an explicit gas limit nothing is estimated: the tx is mined, status 0."""
    fn = env.channel.functions.open(ZERO_ADDRESS, ONE_USDC, DURATION)
    tx_hash = fn.transact({"from": env.consumer.address, "gas": 200_000})
    assert env.w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 0
    assert env.channel.functions.nonces(env.consumer.address).call() == 0


# ------------------------------------------------------------------------------ claim


def test_claim_pays_the_difference(env: Env) -> None:
    channel_id, _ = env.open()
    provider_before = env.balance(env.provider)

    receipt = env.claim(channel_id, 3 * ONE_USDC, nonce=1)
    assert env.balance(env.provider) == provider_before + 3 * ONE_USDC
    (event,) = events(env.channel, "ChannelClaimed", receipt)
    assert event["args"]["channelId"] == channel_id
    assert event["args"]["provider"] == env.provider.address
    assert event["args"]["amount"] == 3 * ONE_USDC
    assert events(env.channel, "FeePaid", receipt) == ()
    assert env.channel.functions.getChannel(channel_id).call()[3] == 3 * ONE_USDC
    assert env.channel.functions.getBalance(channel_id).call() == DEPOSIT - 3 * ONE_USDC

    # A later, higher voucher pays only the difference. The nonce is signed but not
    # checked: a lower nonce than before is accepted.
    receipt = env.claim(channel_id, 5 * ONE_USDC + 17, nonce=0)
    assert env.balance(env.provider) == provider_before + 5 * ONE_USDC + 17
    (event,) = events(env.channel, "ChannelClaimed", receipt)
    assert event["args"]["amount"] == 2 * ONE_USDC + 17

    # The full deposit can be claimed.
    env.claim(channel_id, DEPOSIT, nonce=7)
    assert env.balance(env.provider) == provider_before + DEPOSIT
    assert env.balance(env.channel.address) == 0
    assert env.channel.functions.totalLocked().call() == 0
    assert env.channel.functions.getBalance(channel_id).call() == 0


def test_claim_reverts_on_bad_caller_or_amount(env: Env) -> None:
    channel_id, _ = env.open()
    env.claim(channel_id, 2 * ONE_USDC)
    c = env.channel.functions

    def voucher(amount: int) -> bytes:
        return sign_voucher(env.consumer, env, channel_id, amount, 1)

    # Valid voucher, wrong sender.
    assert_reverts(
        c.claim(channel_id, 3 * ONE_USDC, 1, voucher(3 * ONE_USDC)),
        env.consumer.address,
        "NotProvider",
    )
    assert_reverts(
        c.claim(channel_id, 3 * ONE_USDC, 1, voucher(3 * ONE_USDC)),
        env.stranger.address,
        "NotProvider",
    )
    # amount <= claimed
    assert_reverts(
        c.claim(channel_id, 2 * ONE_USDC, 1, voucher(2 * ONE_USDC)),
        env.provider.address,
        "InvalidAmount",
    )
    assert_reverts(
        c.claim(channel_id, ONE_USDC, 1, voucher(ONE_USDC)),
        env.provider.address,
        "InvalidAmount",
    )
    # amount > deposit
    assert_reverts(
        c.claim(channel_id, DEPOSIT + 1, 1, voucher(DEPOSIT + 1)),
        env.provider.address,
        "InvalidAmount",
    )
    # unknown channel
    unknown = b"\x42" * 32
    sig = sign_voucher(env.consumer, env, unknown, ONE_USDC, 1)
    assert_reverts(c.claim(unknown, ONE_USDC, 1, sig), env.provider.address, "ChannelNotFound")


def test_claim_rejects_bad_signatures(env: Env) -> None:
    channel_id, _ = env.open()
    amount, nonce = 4 * ONE_USDC, 3
    c = env.channel.functions
    good = sign_voucher(env.consumer, env, channel_id, amount, nonce)
    r, s, v = split_signature(good)
    assert v in (27, 28)
    assert s <= SECP256K1_N // 2

    bad = {
        "stranger signed": sign_voucher(env.stranger, env, channel_id, amount, nonce),
        "provider signed": sign_voucher(env.provider, env, channel_id, amount, nonce),
        "other chain id": sign_voucher(env.consumer, env, channel_id, amount, nonce, chain_id=1),
        "other contract": sign_voucher(
            env.consumer,
            env,
            channel_id,
            amount,
            nonce,
            verifying_contract=env.usdc.address,
        ),
        "other amount": sign_voucher(env.consumer, env, channel_id, amount + 1, nonce),
        "other nonce": sign_voucher(env.consumer, env, channel_id, amount, nonce + 1),
        "high s": join_signature(r, SECP256K1_N - s, 55 - v),  # same signer, malleated
        "high s, v = 0/1": join_signature(r, SECP256K1_N - s, 28 - v),
        "v = 2/3 (+ 27 = 29/30)": join_signature(r, s, v - 25),
        "v = 26 (+ 27 = 53)": join_signature(r, s, 26),
        "v = 29/30": join_signature(r, s, v + 2),
        "v = 255": join_signature(r, s, 255),
        "r = 0, v = 0/1": join_signature(0, s, v - 27),
        "s = 0, v = 0/1": join_signature(r, 0, v - 27),
        "64 bytes (EIP-2098 compact)": r.to_bytes(32, "big") + (s | ((v - 27) << 255)).to_bytes(32, "big"),
        "66 bytes": good + b"\x00",
        "empty": b"",
        "zeros": bytes(65),
    }
    for label, sig in bad.items():
        try:
            assert_reverts(
                c.claim(channel_id, amount, nonce, sig),
                env.provider.address,
                "InvalidSignature",
            )
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from exc

    # The untouched voucher still works: the rejections above are about the signature.
    provider_before = env.balance(env.provider)
    env.claim(channel_id, amount, nonce, signature=good)
    assert env.balance(env.provider) == provider_before + amount


def test_claim_accepts_v_0_and_1(env: Env) -> None:
    """The real contract's tryRecover adds 27 to a v below 27: v = 0/1 is v = 27/28."""
    channel_id, _ = env.open()
    provider_before = env.balance(env.provider)
    for amount, nonce in ((ONE_USDC, 1), (2 * ONE_USDC, 2)):
        r, s, v = split_signature(sign_voucher(env.consumer, env, channel_id, amount, nonce))
        env.claim(channel_id, amount, nonce, signature=join_signature(r, s, v - 27))
    assert env.balance(env.provider) == provider_before + 2 * ONE_USDC
    # v = 2 and v = 29 are refused.
    r, s, v = split_signature(sign_voucher(env.consumer, env, channel_id, 3 * ONE_USDC, 3))
    c = env.channel.functions
    for bad_v in (2, 29):
        assert_reverts(
            c.claim(channel_id, 3 * ONE_USDC, 3, join_signature(r, s, bad_v)),
            env.provider.address,
            "InvalidSignature",
        )


def test_claim_after_expiry_before_close(env: Env) -> None:
    channel_id, _ = env.open()
    expiry = env.channel.functions.getChannel(channel_id).call()[4]
    env.travel_past(expiry + 10)
    provider_before = env.balance(env.provider)
    env.claim(channel_id, ONE_USDC)
    assert env.balance(env.provider) == provider_before + ONE_USDC


# -------------------------------------------------------------------------------- fee


def test_fee_split(env: Env) -> None:
    receipt = send(env.w3, env.channel.functions.setFee(env.fee_sink.address, 500), env.deployer)
    assert env.channel.functions.feeBps().call() == 500
    assert env.channel.functions.feeRecipient().call() == env.fee_sink.address
    (updated,) = events(env.channel, "FeeUpdated", receipt)
    assert (updated["args"]["feeRecipient"], updated["args"]["feeBps"]) == (env.fee_sink.address, 500)

    channel_id, _ = env.open()
    provider_before = env.balance(env.provider)
    receipt = env.claim(channel_id, 2 * ONE_USDC)

    assert env.balance(env.fee_sink) == 100_000  # 5 %
    assert env.balance(env.provider) == provider_before + 1_900_000  # 95 %
    (fee,) = events(env.channel, "FeePaid", receipt)
    assert fee["args"]["channelId"] == channel_id
    assert fee["args"]["recipient"] == env.fee_sink.address
    assert fee["args"]["amount"] == 100_000
    (claimed,) = events(env.channel, "ChannelClaimed", receipt)
    assert claimed["args"]["amount"] == 2 * ONE_USDC  # before the fee

    # Rounding: the fee is floored, the provider gets the rest.
    receipt = env.claim(channel_id, 2 * ONE_USDC + 19)
    assert env.balance(env.fee_sink) == 100_000
    assert env.balance(env.provider) == provider_before + 1_900_019
    assert events(env.channel, "FeePaid", receipt) == ()


def test_claim_logs_fee_paid_before_channel_claimed(env: Env) -> None:
    """The deployed V2 pays and logs the fee before the provider's ChannelClaimed: the log order
    of a claim with a fee is Transfer (fee), FeePaid, Transfer (payout), ChannelClaimed."""
    send(env.w3, env.channel.functions.setFee(env.fee_sink.address, 200), env.deployer)
    channel_id, _ = env.open()
    receipt = env.claim(channel_id, 2 * ONE_USDC)
    transfer = Web3.keccak(text="Transfer(address,address,uint256)")
    fee_paid = Web3.keccak(text="FeePaid(bytes32,address,uint256)")
    claimed = Web3.keccak(text="ChannelClaimed(bytes32,address,uint256)")
    assert [(entry["address"], entry["topics"][0]) for entry in receipt["logs"]] == [
        (env.usdc.address, transfer),
        (env.channel.address, fee_paid),
        (env.usdc.address, transfer),
        (env.channel.address, claimed),
    ]
    assert [entry["logIndex"] for entry in receipt["logs"]] == [0, 1, 2, 3]


def test_set_fee_reverts(env: Env) -> None:
    c = env.channel.functions
    assert_reverts(c.setFee(env.fee_sink.address, 1001), env.deployer, "FeeTooHigh")
    assert_reverts(c.setFee(ZERO_ADDRESS, 500), env.deployer, "ZeroAddress")
    assert_reverts(c.setFee(env.fee_sink.address, 500), env.consumer.address, "NotOwner")
    # The maximum is allowed.
    send(env.w3, c.setFee(env.fee_sink.address, 1000), env.deployer)
    assert c.feeBps().call() == 1000
    # No fee needs no recipient.
    send(env.w3, c.setFee(ZERO_ADDRESS, 0), env.deployer)
    assert (c.feeRecipient().call(), c.feeBps().call()) == (ZERO_ADDRESS, 0)
    channel_id, _ = env.open()
    receipt = env.claim(channel_id, ONE_USDC)
    assert events(env.channel, "FeePaid", receipt) == ()


# ------------------------------------------------------------------------------ close


def test_close_refunds_after_expiry(env: Env) -> None:
    channel_id, _ = env.open()
    env.claim(channel_id, 3 * ONE_USDC)
    c = env.channel.functions

    assert_reverts(c.close(channel_id), env.consumer.address, "NotExpired")
    assert_reverts(c.close(channel_id), env.provider.address, "NotConsumer")
    assert_reverts(c.close(b"\x42" * 32), env.consumer.address, "ChannelNotFound")

    expiry = c.getChannel(channel_id).call()[4]
    env.travel_past(expiry)
    consumer_before = env.balance(env.consumer)
    receipt = send(env.w3, c.close(channel_id), env.consumer.address)
    assert env.w3.eth.get_block(receipt["blockNumber"])["timestamp"] >= expiry

    assert env.balance(env.consumer) == consumer_before + DEPOSIT - 3 * ONE_USDC
    assert env.balance(env.channel.address) == 0
    (event,) = events(env.channel, "ChannelClosed", receipt)
    assert event["args"]["channelId"] == channel_id
    assert event["args"]["consumer"] == env.consumer.address
    assert event["args"]["refund"] == DEPOSIT - 3 * ONE_USDC

    assert c.getChannel(channel_id).call() == (ZERO_ADDRESS, ZERO_ADDRESS, 0, 0, 0)
    assert c.getBalance(channel_id).call() == 0
    assert c.totalLocked().call() == 0

    # After the close every unclaimed voucher is worthless.
    sig = sign_voucher(env.consumer, env, channel_id, 5 * ONE_USDC, 2)
    assert_reverts(
        c.claim(channel_id, 5 * ONE_USDC, 2, sig),
        env.provider.address,
        "ChannelNotFound",
    )
    assert_reverts(c.close(channel_id), env.consumer.address, "ChannelNotFound")


def test_close_in_the_block_at_expiry(env: Env) -> None:
    """``block.timestamp >= expiry``: the block stamped exactly ``expiry`` may close."""
    channel_id, _ = env.open()
    expiry = env.channel.functions.getChannel(channel_id).call()[4]
    env.testing.timeTravel(expiry)  # the pending block gets this timestamp
    # Explicit gas: a gas estimate would run on 'latest' (still before expiry) and fail.
    fn = env.channel.functions.close(channel_id)
    tx_hash = fn.transact({"from": env.consumer.address, "gas": 300_000})
    receipt = env.w3.eth.wait_for_transaction_receipt(tx_hash)
    assert env.w3.eth.get_block(receipt["blockNumber"])["timestamp"] == expiry
    assert receipt["status"] == 1
    assert env.channel.functions.getChannel(channel_id).call()[0] == ZERO_ADDRESS


def test_close_fully_claimed_channel(env: Env) -> None:
    channel_id, _ = env.open(duration=0)  # expires immediately
    env.claim(channel_id, DEPOSIT)
    receipt = send(env.w3, env.channel.functions.close(channel_id), env.consumer.address)
    (event,) = events(env.channel, "ChannelClosed", receipt)
    assert event["args"]["refund"] == 0
    assert env.channel.functions.getChannel(channel_id).call()[0] == ZERO_ADDRESS


# ------------------------------------------------------------------ cooperativeClose


def test_cooperative_close(env: Env) -> None:
    channel_id, _ = env.open()
    env.claim(channel_id, 2 * ONE_USDC)
    provider_before = env.balance(env.provider)
    consumer_before = env.balance(env.consumer)

    final = 7 * ONE_USDC
    sig = sign_close(env.provider, env, channel_id, final)
    fn = env.channel.functions.cooperativeClose(channel_id, final, sig)
    receipt = send(env.w3, fn, env.consumer.address)  # before expiry

    assert env.balance(env.provider) == provider_before + final - 2 * ONE_USDC
    assert env.balance(env.consumer) == consumer_before + DEPOSIT - final
    assert env.balance(env.channel.address) == 0
    assert env.channel.functions.getChannel(channel_id).call()[0] == ZERO_ADDRESS
    assert env.channel.functions.totalLocked().call() == 0
    (claimed,) = events(env.channel, "ChannelClaimed", receipt)
    assert claimed["args"]["provider"] == env.provider.address
    assert claimed["args"]["amount"] == final - 2 * ONE_USDC
    (closed,) = events(env.channel, "ChannelClosed", receipt)
    assert closed["args"]["consumer"] == env.consumer.address
    assert closed["args"]["refund"] == DEPOSIT - final


def test_cooperative_close_with_fee_and_nothing_to_pay(env: Env) -> None:
    send(env.w3, env.channel.functions.setFee(env.fee_sink.address, 1000), env.deployer)
    channel_id, _ = env.open()
    env.claim(channel_id, ONE_USDC)  # fee 100_000
    provider_before = env.balance(env.provider)
    consumer_before = env.balance(env.consumer)

    # finalAmount == claimed: no payout, no ChannelClaimed, no FeePaid.
    sig = sign_close(env.provider, env, channel_id, ONE_USDC)
    receipt = send(
        env.w3,
        env.channel.functions.cooperativeClose(channel_id, ONE_USDC, sig),
        env.consumer.address,
    )
    assert events(env.channel, "ChannelClaimed", receipt) == ()
    assert events(env.channel, "FeePaid", receipt) == ()
    assert env.balance(env.provider) == provider_before
    assert env.balance(env.consumer) == consumer_before + DEPOSIT - ONE_USDC
    assert env.balance(env.fee_sink) == 100_000

    # And with a payout the fee applies as in claim.
    channel_id, _ = env.open()
    sig = sign_close(env.provider, env, channel_id, 3 * ONE_USDC)
    receipt = send(
        env.w3,
        env.channel.functions.cooperativeClose(channel_id, 3 * ONE_USDC, sig),
        env.consumer.address,
    )
    (fee,) = events(env.channel, "FeePaid", receipt)
    assert fee["args"]["amount"] == 300_000
    assert env.balance(env.fee_sink) == 400_000
    assert env.balance(env.provider) == provider_before + 2_700_000


def test_cooperative_close_reverts(env: Env) -> None:
    channel_id, _ = env.open()
    env.claim(channel_id, 2 * ONE_USDC)
    c = env.channel.functions

    def auth(amount: int, signer: LocalAccount | None = None) -> bytes:
        return sign_close(signer or env.provider, env, channel_id, amount)

    final = 5 * ONE_USDC
    assert_reverts(
        c.cooperativeClose(channel_id, final, auth(final, env.consumer)),
        env.consumer.address,
        "InvalidSignature",
    )
    assert_reverts(
        c.cooperativeClose(channel_id, final + 1, auth(final)),
        env.consumer.address,
        "InvalidSignature",
    )
    # A voucher signature is not a close authorization.
    voucher = sign_voucher(env.provider, env, channel_id, final, 0)
    assert_reverts(
        c.cooperativeClose(channel_id, final, voucher),
        env.consumer.address,
        "InvalidSignature",
    )
    low = 2 * ONE_USDC - 1
    assert_reverts(
        c.cooperativeClose(channel_id, low, auth(low)),
        env.consumer.address,
        "InvalidAmount",
    )
    assert_reverts(
        c.cooperativeClose(channel_id, DEPOSIT + 1, auth(DEPOSIT + 1)),
        env.consumer.address,
        "InvalidAmount",
    )
    assert_reverts(
        c.cooperativeClose(channel_id, final, auth(final)),
        env.provider.address,
        "NotConsumer",
    )
    assert_reverts(
        c.cooperativeClose(b"\x42" * 32, final, auth(final)),
        env.consumer.address,
        "ChannelNotFound",
    )
    # The channel is untouched.
    assert c.getChannel(channel_id).call()[2:4] == (DEPOSIT, 2 * ONE_USDC)


def test_cooperative_close_accepts_v_0_and_1(env: Env) -> None:
    channel_id, _ = env.open()
    final = 4 * ONE_USDC
    r, s, v = split_signature(sign_close(env.provider, env, channel_id, final))
    c = env.channel.functions
    for bad_v in (2, 29):
        assert_reverts(
            c.cooperativeClose(channel_id, final, join_signature(r, s, bad_v)),
            env.consumer.address,
            "InvalidSignature",
        )
    provider_before = env.balance(env.provider)
    send(env.w3, c.cooperativeClose(channel_id, final, join_signature(r, s, v - 27)), env.consumer.address)
    assert env.balance(env.provider) == provider_before + final
    assert c.getChannel(channel_id).call()[0] == ZERO_ADDRESS


# -------------------------------------------------------------------------------- admin


def test_sweep(env: Env) -> None:
    c = env.channel.functions
    assert_reverts(c.sweep(), env.deployer, "NoExcess")

    channel_id, _ = env.open()
    assert_reverts(c.sweep(), env.deployer, "NoExcess")

    stray = env.usdc.functions.transfer(env.channel.address, 1234)
    send(env.w3, stray, env.consumer.address)
    assert_reverts(c.sweep(), env.consumer.address, "NotOwner")
    owner_before = env.balance(env.deployer)
    receipt = send(env.w3, c.sweep(), env.deployer)  # to the caller, the owner
    assert env.balance(env.deployer) == owner_before + 1234
    (swept,) = events(env.channel, "Swept", receipt)
    assert (swept["args"]["to"], swept["args"]["amount"]) == (env.deployer, 1234)
    assert env.balance(env.channel.address) == DEPOSIT == c.totalLocked().call()
    assert_reverts(c.sweep(), env.deployer, "NoExcess")

    # The open channel's money is still all there.
    env.claim(channel_id, DEPOSIT)
    assert env.balance(env.channel.address) == 0


def test_set_usdc(env: Env) -> None:
    c = env.channel.functions
    assert_reverts(c.setUSDC(env.stranger.address), env.consumer.address, "NotOwner")
    assert_reverts(c.setUSDC(ZERO_ADDRESS), env.deployer, "ZeroAddress")
    receipt = send(env.w3, c.setUSDC(env.stranger.address), env.deployer)
    assert c.usdc().call() == env.stranger.address
    (updated,) = events(env.channel, "USDCUpdated", receipt)
    assert (updated["args"]["oldUsdc"], updated["args"]["newUsdc"]) == (env.usdc.address, env.stranger.address)


def test_renounce_ownership(env: Env) -> None:
    c = env.channel.functions
    assert_reverts(c.renounceOwnership(), env.consumer.address, "NotOwner")
    receipt = send(env.w3, c.renounceOwnership(), env.deployer)
    (renounced,) = events(env.channel, "OwnershipRenounced", receipt)
    assert renounced["args"]["previousOwner"] == env.deployer
    assert c.owner().call() == ZERO_ADDRESS
    assert c.isImmutable().call() is True
    for fn in (c.setFee(env.fee_sink.address, 100), c.setUSDC(env.stranger.address), c.sweep(), c.renounceOwnership()):
        assert_reverts(fn, env.deployer, "NotOwner")
    # Channels work as before.
    channel_id, _ = env.open()
    env.claim(channel_id, ONE_USDC)


# ------------------------------------------------------------------------------- V1


def open_v1(env: Env, amount: int = DEPOSIT, duration: int = DURATION) -> bytes:
    receipt = send(env.w3, env.channel_v1.functions.open(env.provider.address, amount, duration), env.consumer.address)
    (event,) = events(env.channel_v1, "ChannelOpened", receipt)
    return bytes(event["args"]["channelId"])


def test_v1_claims_without_fee_and_closes_after_expiry(env: Env) -> None:
    v1 = env.channel_v1.functions
    assert v1.owner().call() == env.deployer and v1.usdc().call() == env.usdc.address
    assert v1.VOUCHER_TYPEHASH().call() == Web3.keccak(text="Voucher(bytes32 channelId,uint256 amount,uint256 nonce)")
    # V2's fee does not reach V1: same token, another contract.
    send(env.w3, env.channel.functions.setFee(env.fee_sink.address, 1000), env.deployer)
    channel_id = open_v1(env)
    assert v1.getChannel(channel_id).call()[:3] == (env.consumer.address, env.provider.address, DEPOSIT)

    # A voucher for V2's domain is not one for V1's (and the other way round).
    wrong = sign_voucher(env.consumer, env, channel_id, 3 * ONE_USDC, 1)
    assert_reverts(v1.claim(channel_id, 3 * ONE_USDC, 1, wrong), env.provider.address, "InvalidSignature")
    right = sign_voucher(env.consumer, env, channel_id, 3 * ONE_USDC, 1, verifying_contract=env.channel_v1.address)
    assert_reverts(v1.claim(channel_id, 3 * ONE_USDC, 1, right), env.stranger.address, "NotProvider")
    provider_before = env.balance(env.provider)
    receipt = send(env.w3, v1.claim(channel_id, 3 * ONE_USDC, 1, right), env.provider.address)
    assert env.balance(env.provider) == provider_before + 3 * ONE_USDC  # all of it: no fee in V1
    assert env.balance(env.fee_sink) == 0
    (claimed,) = events(env.channel_v1, "ChannelClaimed", receipt)
    assert (claimed["args"]["provider"], claimed["args"]["amount"]) == (env.provider.address, 3 * ONE_USDC)
    assert_reverts(v1.claim(channel_id, 3 * ONE_USDC, 2, right), env.provider.address, "InvalidAmount")

    assert_reverts(v1.close(channel_id), env.consumer.address, "NotExpired")
    env.travel_past(v1.getChannel(channel_id).call()[4])
    consumer_before = env.balance(env.consumer)
    receipt = send(env.w3, v1.close(channel_id), env.consumer.address)
    assert env.balance(env.consumer) == consumer_before + DEPOSIT - 3 * ONE_USDC
    (closed,) = events(env.channel_v1, "ChannelClosed", receipt)
    assert (closed["args"]["channelId"], closed["args"]["refund"]) == (channel_id, DEPOSIT - 3 * ONE_USDC)
    assert v1.getChannel(channel_id).call() == (ZERO_ADDRESS, ZERO_ADDRESS, 0, 0, 0)


def test_v1_has_no_v2_functions(env: Env) -> None:
    """feeBps() is how the provider tells V2 from V1 (checks.py): V1 has no such function."""
    fee_bps = selector("feeBps()")
    assert env.w3.eth.call({"to": env.channel.address, "data": fee_bps}) == bytes(32)
    with pytest.raises(TransactionFailed) as info:
        env.w3.eth.call({"to": env.channel_v1.address, "data": fee_bps})
    assert revert_data(info.value) == b""  # no such function, and no fallback: a bare revert


def test_v1_admin(env: Env) -> None:
    v1 = env.channel_v1.functions
    assert_reverts(v1.setUSDC(env.stranger.address), env.consumer.address, "NotOwner")
    assert_reverts(v1.setUSDC(ZERO_ADDRESS), env.deployer, "ZeroAddress")
    receipt = send(env.w3, v1.renounceOwnership(), env.deployer)
    (renounced,) = events(env.channel_v1, "OwnershipRenounced", receipt)
    assert renounced["args"]["previousOwner"] == env.deployer
    assert v1.isImmutable().call() is True
    assert_reverts(v1.setUSDC(env.stranger.address), env.deployer, "NotOwner")


# -------------------------------------------------------------------------- TestUSDC


def test_test_usdc(env: Env) -> None:
    u = env.usdc.functions
    assert u.name().call() == "Test USD Coin"
    assert u.symbol().call() == "USDC"
    assert u.decimals().call() == 6

    supply = u.totalSupply().call()
    # Anyone can mint.
    receipt = send(env.w3, u.mint(env.stranger.address, 500), env.stranger.address)
    assert u.balanceOf(env.stranger.address).call() == 500
    assert u.totalSupply().call() == supply + 500
    (event,) = events(env.usdc, "Transfer", receipt)
    assert (event["args"]["from"], event["args"]["to"], event["args"]["value"]) == (
        ZERO_ADDRESS,
        env.stranger.address,
        500,
    )

    # transferFrom without an allowance reverts
    fn = u.transferFrom(env.stranger.address, env.provider.address, 100)
    with pytest.raises((ContractCustomError, TransactionFailed)) as info:
        fn.transact({"from": env.provider.address})
    assert (revert_data(info.value) or b"")[:4] == selector("ERC20InsufficientAllowance(address,uint256,uint256)")

    # with a finite allowance it works and spends the allowance
    receipt = send(env.w3, u.approve(env.provider.address, 150), env.stranger.address)
    (approval,) = events(env.usdc, "Approval", receipt)
    assert approval["args"]["value"] == 150
    send(env.w3, fn, env.provider.address)
    assert u.balanceOf(env.provider.address).call() == 100
    assert u.allowance(env.stranger.address, env.provider.address).call() == 50

    # more than the balance reverts
    with pytest.raises((ContractCustomError, TransactionFailed)) as info:
        u.transfer(env.provider.address, 401).transact({"from": env.stranger.address})
    assert (revert_data(info.value) or b"")[:4] == selector("ERC20InsufficientBalance(address,uint256,uint256)")
