// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @dev The ERC-20 calls this contract makes on its token.
interface IERC20V1 {
    function transfer(address to, uint256 amount) external returns (bool);

    function transferFrom(address from, address to, uint256 amount) external returns (bool);
}

/// @title DrainChannelV1 (test implementation of the DRAIN V1 payment channel)
/// @notice The first DRAIN deployment, which the DRAIN SDK and the reference provider still
/// default to: a consumer locks USDC in a channel towards one provider and pays with off-chain
/// EIP-712 vouchers carrying a cumulative amount; the provider claims the highest voucher; the
/// consumer takes the rest back after expiry. Unlike V2: no protocol fee, no cooperative close,
/// no sweep, no totalLocked.
/// @dev Written to the interface of DRAIN's contracts/src/DrainChannel.sol (checked entry by
/// entry against tests/data/DrainChannelV1.abi.json): the same functions, events and errors, with
/// the same names, argument types and order, `NoOwner` included (declared, never raised, as
/// there). The EIP-712 domain is V2's: name "DrainChannel", version "1". Self-contained like
/// DrainChannel.sol: OpenZeppelin's ECDSA.tryRecover is `_recover` here.
contract DrainChannelV1 {
    struct Channel {
        address consumer;
        address provider;
        uint256 deposit;
        uint256 claimed;
        uint256 expiry;
    }

    // ------------------------------------------------------------------ errors

    error NotOwner();
    error NoOwner();
    error ZeroAddress();
    error ChannelExists();
    error ChannelNotFound();
    error NotProvider();
    error NotConsumer();
    error NotExpired();
    error InvalidSignature();
    error InvalidAmount();
    error TransferFailed();

    // ------------------------------------------------------------------ events

    event ChannelOpened(
        bytes32 indexed channelId,
        address indexed consumer,
        address indexed provider,
        uint256 deposit,
        uint256 expiry
    );
    event ChannelClaimed(bytes32 indexed channelId, address indexed provider, uint256 amount);
    event ChannelClosed(bytes32 indexed channelId, address indexed consumer, uint256 refund);
    event USDCUpdated(address indexed oldUsdc, address indexed newUsdc);
    event OwnershipRenounced(address indexed previousOwner);

    // --------------------------------------------------------------- constants

    bytes32 public constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint256 amount,uint256 nonce)");

    /// @dev Upper bound of the lower half of the secp256k1 group order (EIP-2).
    uint256 private constant HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    // ------------------------------------------------------------------- state

    bytes32 public immutable DOMAIN_SEPARATOR;

    /// @notice address(0) once ownership is renounced (then `isImmutable()`).
    address public owner;
    IERC20V1 public usdc;

    mapping(bytes32 => Channel) public channels;
    /// @notice Per consumer: how many channels it has opened (part of each channel id).
    mapping(address => uint256) public nonces;

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    constructor(address _usdc) {
        if (_usdc == address(0)) revert ZeroAddress();
        owner = msg.sender;
        usdc = IERC20V1(_usdc);
        DOMAIN_SEPARATOR = keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("DrainChannel"), keccak256("1"), block.chainid, address(this))
        );
    }

    // ------------------------------------------------------------------- admin

    function setUSDC(address _usdc) external onlyOwner {
        if (_usdc == address(0)) revert ZeroAddress();
        address previous = address(usdc);
        usdc = IERC20V1(_usdc);
        emit USDCUpdated(previous, _usdc);
    }

    function renounceOwnership() external onlyOwner {
        address previous = owner;
        owner = address(0);
        emit OwnershipRenounced(previous);
    }

    // ---------------------------------------------------------------- channels

    /// @notice The channel id is keccak256(consumer, provider, block.timestamp, the consumer's
    /// count of channels opened here): V2 derives it the same way, so one id may exist on both.
    function open(address provider, uint256 amount, uint256 duration) external returns (bytes32 channelId) {
        if (amount == 0) revert InvalidAmount();
        if (provider == address(0)) revert ZeroAddress();

        channelId = keccak256(abi.encodePacked(msg.sender, provider, block.timestamp, nonces[msg.sender]++));
        if (channels[channelId].consumer != address(0)) revert ChannelExists();
        uint256 expiry = block.timestamp + duration;
        channels[channelId] =
            Channel({consumer: msg.sender, provider: provider, deposit: amount, claimed: 0, expiry: expiry});

        _callToken(abi.encodeCall(IERC20V1.transferFrom, (msg.sender, address(this), amount)));

        emit ChannelOpened(channelId, msg.sender, provider, amount, expiry);
    }

    /// @notice Pays the provider what `amount` (cumulative) adds to what was claimed; no fee.
    function claim(bytes32 channelId, uint256 amount, uint256 nonce, bytes calldata signature) external {
        Channel storage ch = channels[channelId];
        if (ch.consumer == address(0)) revert ChannelNotFound();
        if (msg.sender != ch.provider) revert NotProvider();
        if (amount > ch.deposit || amount <= ch.claimed) revert InvalidAmount();

        bytes32 digest = keccak256(
            abi.encodePacked(
                hex"1901", DOMAIN_SEPARATOR, keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, amount, nonce))
            )
        );
        if (_recover(digest, signature) != ch.consumer) revert InvalidSignature();

        uint256 payout = amount - ch.claimed;
        ch.claimed = amount;
        _callToken(abi.encodeCall(IERC20V1.transfer, (msg.sender, payout)));

        emit ChannelClaimed(channelId, msg.sender, payout);
    }

    /// @notice After expiry, the consumer takes back what was not claimed; the channel is deleted.
    function close(bytes32 channelId) external {
        Channel memory ch = channels[channelId];
        if (ch.consumer == address(0)) revert ChannelNotFound();
        if (msg.sender != ch.consumer) revert NotConsumer();
        if (block.timestamp < ch.expiry) revert NotExpired();

        uint256 refund = ch.deposit - ch.claimed;
        delete channels[channelId];
        if (refund > 0) _callToken(abi.encodeCall(IERC20V1.transfer, (msg.sender, refund)));

        emit ChannelClosed(channelId, msg.sender, refund);
    }

    // ------------------------------------------------------------------- views

    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        return channels[channelId];
    }

    function getBalance(bytes32 channelId) external view returns (uint256) {
        Channel storage ch = channels[channelId];
        return ch.deposit - ch.claimed;
    }

    function isImmutable() external view returns (bool) {
        return owner == address(0);
    }

    // ---------------------------------------------------------------- internal

    /// @dev OpenZeppelin's tryRecover, as DrainChannel.sol's: 65 bytes, low s, v below 27 gets 27
    /// added and must then be 27 or 28, a non-zero signer; anything else reverts InvalidSignature.
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address signer) {
        if (signature.length != 65) revert InvalidSignature();
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > HALF_ORDER) revert InvalidSignature();
        if (v < 27) v += 27;
        if (v != 27 && v != 28) revert InvalidSignature();
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
    }

    /// @dev Any failure of the token call (revert, `false`, no code) is TransferFailed.
    function _callToken(bytes memory data) private {
        address token = address(usdc);
        (bool success, bytes memory ret) = token.call(data);
        bool ok = success
            && (ret.length == 0 ? token.code.length > 0 : (ret.length >= 32 && uint256(bytes32(ret)) == 1));
        if (!ok) revert TransferFailed();
    }
}
