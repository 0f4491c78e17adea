// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @dev The ERC-20 calls DrainChannel makes on its token (the real contract's IERC20 has these and
/// approve/allowance, which it never calls).
interface IERC20 {
    function transfer(address to, uint256 amount) external returns (bool);

    function transferFrom(address from, address to, uint256 amount) external returns (bool);

    function balanceOf(address account) external view returns (uint256);
}

/// @title DrainChannel (test implementation of the DRAIN V2 payment channel)
/// @notice A consumer locks USDC in a channel towards one provider and pays with
/// off-chain EIP-712 vouchers carrying a cumulative amount. The provider claims the
/// highest voucher; the consumer reclaims the rest after expiry, or at any time with
/// a provider-signed CloseAuthorization.
/// @dev Written from drain-provider's docs/PROTOCOL.md to the interface of DRAIN's
/// DrainChannelV2.sol: the same functions, events and errors, with the same names, argument
/// types and order, so that the ABI built from this file talks to the deployed contracts.
/// Self-contained (no imports) so that compile.js needs nothing but the pinned solc: the
/// real contract's OpenZeppelin ECDSA.tryRecover is inlined as `_recover`.
contract DrainChannel {
    struct Channel {
        address consumer;
        address provider;
        uint256 deposit;
        uint256 claimed;
        uint256 expiry;
    }

    // ------------------------------------------------------------------ errors

    error NotOwner();
    error ZeroAddress();
    error ChannelExists();
    error ChannelNotFound();
    error NotProvider();
    error NotConsumer();
    error NotExpired();
    error InvalidSignature();
    error InvalidAmount();
    error TransferFailed();
    error FeeTooHigh();
    error NoExcess();

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
    event FeePaid(bytes32 indexed channelId, address indexed recipient, uint256 amount);
    event FeeUpdated(address indexed feeRecipient, uint256 feeBps);
    event Swept(address indexed to, uint256 amount);
    event USDCUpdated(address indexed oldUsdc, address indexed newUsdc);
    event OwnershipRenounced(address indexed previousOwner);

    // --------------------------------------------------------------- constants

    bytes32 public constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint256 amount,uint256 nonce)");
    bytes32 public constant CLOSE_TYPEHASH = keccak256("CloseAuthorization(bytes32 channelId,uint256 finalAmount)");

    uint256 private constant MAX_FEE_BPS = 1000; // 10 %
    uint256 private constant BPS = 10000;

    /// @dev Upper bound of the lower half of the secp256k1 group order (EIP-2).
    uint256 private constant HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    // ------------------------------------------------------------------- state

    /// @notice Fixed at deployment, for the deployment's chain id, as in the real contract.
    bytes32 public immutable DOMAIN_SEPARATOR;

    /// @notice address(0) once ownership is renounced (then `isImmutable()`).
    address public owner;
    /// @notice The payment token (USDC); the owner may replace it (`setUSDC`).
    IERC20 public usdc;
    /// @notice Receives the protocol fee; address(0) until `setFee` names one (then no fee).
    address public feeRecipient;
    uint256 public feeBps;

    /// @notice Tokens still owed to open channels (sum of deposit - claimed).
    uint256 public totalLocked;

    mapping(bytes32 => Channel) public channels;
    mapping(address => uint256) public nonces;

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    constructor(address _usdc) {
        if (_usdc == address(0)) revert ZeroAddress();
        owner = msg.sender;
        usdc = IERC20(_usdc);
        DOMAIN_SEPARATOR = keccak256(
            abi.encode(DOMAIN_TYPEHASH, keccak256("DrainChannel"), keccak256("1"), block.chainid, address(this))
        );
    }

    // ------------------------------------------------------------------- admin

    function setUSDC(address _usdc) external onlyOwner {
        if (_usdc == address(0)) revert ZeroAddress();
        address oldUsdc = address(usdc);
        usdc = IERC20(_usdc);
        emit USDCUpdated(oldUsdc, _usdc);
    }

    /// @notice Gives up the admin functions for good.
    function renounceOwnership() external onlyOwner {
        address previousOwner = owner;
        owner = address(0);
        emit OwnershipRenounced(previousOwner);
    }

    /// @notice A fee of `_feeBps` (at most 10 %) of every payout goes to `_feeRecipient`.
    /// The recipient may be address(0) only with a zero fee.
    function setFee(address _feeRecipient, uint256 _feeBps) external onlyOwner {
        if (_feeBps > MAX_FEE_BPS) revert FeeTooHigh();
        if (_feeBps > 0 && _feeRecipient == address(0)) revert ZeroAddress();
        feeRecipient = _feeRecipient;
        feeBps = _feeBps;
        emit FeeUpdated(_feeRecipient, _feeBps);
    }

    /// @notice Sends the owner the tokens held beyond what open channels are owed (e.g. a stray
    /// transfer).
    function sweep() external onlyOwner {
        uint256 balance = usdc.balanceOf(address(this));
        uint256 locked = totalLocked;
        if (balance <= locked) revert NoExcess();
        uint256 excess = balance - locked;
        _send(msg.sender, excess);
        emit Swept(msg.sender, excess);
    }

    // ---------------------------------------------------------------- channels

    function open(address provider, uint256 amount, uint256 duration) external returns (bytes32 channelId) {
        if (amount == 0) revert InvalidAmount();
        if (provider == address(0)) revert ZeroAddress();

        uint256 expiry = block.timestamp + duration;
        channelId = keccak256(abi.encodePacked(msg.sender, provider, block.timestamp, nonces[msg.sender]++));
        if (channels[channelId].consumer != address(0)) revert ChannelExists();

        channels[channelId] =
            Channel({consumer: msg.sender, provider: provider, deposit: amount, claimed: 0, expiry: expiry});
        totalLocked += amount;

        _pull(msg.sender, amount);

        emit ChannelOpened(channelId, msg.sender, provider, amount, expiry);
    }

    function claim(bytes32 channelId, uint256 amount, uint256 nonce, bytes calldata signature) external {
        Channel storage ch = channels[channelId];
        address consumer = ch.consumer;
        if (consumer == address(0)) revert ChannelNotFound();
        if (msg.sender != ch.provider) revert NotProvider();
        uint256 claimed = ch.claimed;
        if (amount > ch.deposit || amount <= claimed) revert InvalidAmount();

        bytes32 structHash = keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, amount, nonce));
        if (_recover(_hashTypedData(structHash), signature) != consumer) revert InvalidSignature();

        uint256 payout = amount - claimed;
        ch.claimed = amount;
        totalLocked -= payout;

        uint256 fee = _payFee(channelId, payout);
        _send(msg.sender, payout - fee);

        emit ChannelClaimed(channelId, msg.sender, payout);
    }

    function close(bytes32 channelId) external {
        Channel memory ch = channels[channelId];
        if (ch.consumer == address(0)) revert ChannelNotFound();
        if (msg.sender != ch.consumer) revert NotConsumer();
        if (block.timestamp < ch.expiry) revert NotExpired();

        uint256 refund = ch.deposit - ch.claimed;
        delete channels[channelId];
        totalLocked -= refund;

        if (refund > 0) _send(msg.sender, refund);

        emit ChannelClosed(channelId, msg.sender, refund);
    }

    function cooperativeClose(bytes32 channelId, uint256 finalAmount, bytes calldata providerSignature) external {
        Channel memory ch = channels[channelId];
        if (ch.consumer == address(0)) revert ChannelNotFound();
        if (msg.sender != ch.consumer) revert NotConsumer();
        if (finalAmount > ch.deposit || finalAmount < ch.claimed) revert InvalidAmount();

        bytes32 structHash = keccak256(abi.encode(CLOSE_TYPEHASH, channelId, finalAmount));
        if (_recover(_hashTypedData(structHash), providerSignature) != ch.provider) revert InvalidSignature();

        uint256 payout = finalAmount - ch.claimed;
        uint256 refund = ch.deposit - finalAmount;
        delete channels[channelId];
        totalLocked -= payout + refund;

        if (payout > 0) {
            uint256 fee = _payFee(channelId, payout);
            _send(ch.provider, payout - fee);
            emit ChannelClaimed(channelId, ch.provider, payout);
        }
        if (refund > 0) _send(msg.sender, refund);

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

    /// @notice True once the owner has renounced: nobody can change the fee or the token.
    function isImmutable() external view returns (bool) {
        return owner == address(0);
    }

    // ---------------------------------------------------------------- internal

    function _hashTypedData(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked(hex"1901", DOMAIN_SEPARATOR, structHash));
    }

    /// @dev The real contract's ECDSA.tryRecover (OpenZeppelin-style): exactly 65 bytes (r, s, v);
    /// s in the lower half order; a v below 27 gets 27 added (so 0/1 are 27/28, and 2..26 fail),
    /// then v must be 27 or 28; ecrecover must return a non-zero signer (it does not for r or s
    /// of 0). Any failure reverts InvalidSignature.
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

    /// @dev Pays the protocol fee on a payout, if there is a fee and a recipient, and emits FeePaid.
    function _payFee(bytes32 channelId, uint256 payout) private returns (uint256 fee) {
        address recipient = feeRecipient;
        if (feeBps > 0 && recipient != address(0)) fee = (payout * feeBps) / BPS;
        if (fee > 0) {
            _send(recipient, fee);
            emit FeePaid(channelId, recipient, fee);
        }
    }

    function _send(address to, uint256 amount) private {
        _callToken(abi.encodeCall(IERC20.transfer, (to, amount)));
    }

    function _pull(address from, uint256 amount) private {
        _callToken(abi.encodeCall(IERC20.transferFrom, (from, address(this), amount)));
    }

    /// @dev Calls the token; any failure (revert, `false`, malformed return data, no code)
    /// becomes TransferFailed. A token that returns nothing is accepted, as SafeERC20 does.
    function _callToken(bytes memory data) private {
        address token = address(usdc);
        (bool success, bytes memory ret) = token.call(data);
        bool ok = success
            && (ret.length == 0 ? token.code.length > 0 : (ret.length >= 32 && uint256(bytes32(ret)) == 1));
        if (!ok) revert TransferFailed();
    }
}
