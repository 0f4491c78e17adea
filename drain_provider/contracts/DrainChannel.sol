// SPDX-License-Identifier: MIT
pragma solidity 0.8.28;

/// @dev The three ERC-20 calls DrainChannel makes on its token.
interface IERC20Minimal {
    function transfer(address to, uint256 amount) external returns (bool);

    function transferFrom(address from, address to, uint256 amount) external returns (bool);

    function balanceOf(address account) external view returns (uint256);
}

/// @title DrainChannel (test implementation of the DRAIN V2 payment channel)
/// @notice A consumer locks USDC in a channel towards one provider and pays with
/// off-chain EIP-712 vouchers carrying a cumulative amount. The provider claims the
/// highest voucher; the consumer reclaims the rest after expiry, or at any time with
/// a provider-signed CloseAuthorization.
/// @dev Written from drain-provider's docs/PROTOCOL.md. Self-contained: no imports.
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

    // --------------------------------------------------------------- constants

    uint256 private constant MAX_FEE_BPS = 1000; // 10 %
    uint256 private constant BPS = 10000;

    /// @dev Upper bound of the lower half of the secp256k1 group order (EIP-2).
    uint256 private constant HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("DrainChannel");
    bytes32 private constant VERSION_HASH = keccak256("1");
    bytes32 private constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint256 amount,uint256 nonce)");
    bytes32 private constant CLOSE_AUTHORIZATION_TYPEHASH =
        keccak256("CloseAuthorization(bytes32 channelId,uint256 finalAmount)");

    // ------------------------------------------------------------------- state

    /// @notice The payment token (USDC).
    address public immutable usdc;

    bytes32 private immutable _cachedDomainSeparator;
    uint256 private immutable _cachedChainId;
    address private immutable _cachedThis;

    address public owner;
    uint256 public feeBps;
    address public feeRecipient;

    /// @notice Tokens still owed to open channels (sum of deposit - claimed).
    uint256 public totalLocked;

    mapping(bytes32 => Channel) public channels;
    mapping(address => uint256) public nonces;

    modifier onlyOwner() {
        if (msg.sender != owner) revert NotOwner();
        _;
    }

    constructor(address usdc_) {
        if (usdc_ == address(0)) revert ZeroAddress();
        usdc = usdc_;
        owner = msg.sender;
        feeRecipient = msg.sender;
        _cachedChainId = block.chainid;
        _cachedThis = address(this);
        _cachedDomainSeparator = _buildDomainSeparator();
    }

    // ------------------------------------------------------------------- admin

    function setFee(uint256 newFeeBps, address newRecipient) external onlyOwner {
        if (newFeeBps > MAX_FEE_BPS) revert FeeTooHigh();
        if (newRecipient == address(0)) revert ZeroAddress();
        feeBps = newFeeBps;
        feeRecipient = newRecipient;
    }

    /// @notice Sends the tokens held beyond what open channels are owed (e.g. a stray transfer).
    function withdrawExcess(address to) external onlyOwner {
        if (to == address(0)) revert ZeroAddress();
        uint256 balance = IERC20Minimal(usdc).balanceOf(address(this));
        uint256 locked = totalLocked;
        if (balance <= locked) revert NoExcess();
        _send(to, balance - locked);
    }

    // ---------------------------------------------------------------- channels

    function open(address provider, uint256 amount, uint256 duration) external returns (bytes32 channelId) {
        if (provider == address(0)) revert ZeroAddress();
        if (amount == 0) revert InvalidAmount();

        channelId = keccak256(abi.encodePacked(msg.sender, provider, block.timestamp, nonces[msg.sender]++));
        if (channels[channelId].consumer != address(0)) revert ChannelExists();

        uint256 expiry = block.timestamp + duration;
        channels[channelId] =
            Channel({consumer: msg.sender, provider: provider, deposit: amount, claimed: 0, expiry: expiry});
        totalLocked += amount;

        emit ChannelOpened(channelId, msg.sender, provider, amount, expiry);

        _pull(msg.sender, amount);
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

        emit ChannelClaimed(channelId, msg.sender, payout);
        uint256 fee = _feeOf(channelId, payout);

        if (fee > 0) _send(feeRecipient, fee);
        _send(msg.sender, payout - fee);
    }

    function close(bytes32 channelId) external {
        Channel memory ch = channels[channelId];
        if (ch.consumer == address(0)) revert ChannelNotFound();
        if (msg.sender != ch.consumer) revert NotConsumer();
        if (block.timestamp < ch.expiry) revert NotExpired();

        uint256 refund = ch.deposit - ch.claimed;
        delete channels[channelId];
        totalLocked -= refund;

        emit ChannelClosed(channelId, msg.sender, refund);

        if (refund > 0) _send(msg.sender, refund);
    }

    function cooperativeClose(bytes32 channelId, uint256 finalAmount, bytes calldata providerSignature) external {
        Channel memory ch = channels[channelId];
        if (ch.consumer == address(0)) revert ChannelNotFound();
        if (msg.sender != ch.consumer) revert NotConsumer();
        if (finalAmount < ch.claimed || finalAmount > ch.deposit) revert InvalidAmount();

        bytes32 structHash = keccak256(abi.encode(CLOSE_AUTHORIZATION_TYPEHASH, channelId, finalAmount));
        if (_recover(_hashTypedData(structHash), providerSignature) != ch.provider) revert InvalidSignature();

        uint256 payout = finalAmount - ch.claimed;
        uint256 refund = ch.deposit - finalAmount;
        delete channels[channelId];
        totalLocked -= payout + refund;

        uint256 fee;
        if (payout > 0) {
            emit ChannelClaimed(channelId, ch.provider, payout);
            fee = _feeOf(channelId, payout);
        }
        emit ChannelClosed(channelId, msg.sender, refund);

        if (fee > 0) _send(feeRecipient, fee);
        if (payout - fee > 0) _send(ch.provider, payout - fee);
        if (refund > 0) _send(msg.sender, refund);
    }

    // ------------------------------------------------------------------- views

    function getChannel(bytes32 channelId) external view returns (Channel memory) {
        return channels[channelId];
    }

    function getBalance(bytes32 channelId) external view returns (uint256) {
        Channel storage ch = channels[channelId];
        return ch.deposit - ch.claimed;
    }

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        if (block.chainid == _cachedChainId && address(this) == _cachedThis) return _cachedDomainSeparator;
        return _buildDomainSeparator();
    }

    // ---------------------------------------------------------------- internal

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    function _hashTypedData(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked(hex"1901", DOMAIN_SEPARATOR(), structHash));
    }

    /// @dev OpenZeppelin-style ECDSA recovery: exactly 65 bytes (r, s, v), v in {27, 28},
    /// s in the lower half order, non-zero signer. Any failure reverts InvalidSignature.
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address signer) {
        if (signature.length != 65) revert InvalidSignature();
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > HALF_ORDER) revert InvalidSignature();
        if (v != 27 && v != 28) revert InvalidSignature();
        signer = ecrecover(digest, v, r, s);
        if (signer == address(0)) revert InvalidSignature();
    }

    /// @dev Computes the protocol fee on a payout and emits FeePaid when it is non-zero.
    function _feeOf(bytes32 channelId, uint256 payout) private returns (uint256 fee) {
        fee = (payout * feeBps) / BPS;
        if (fee > 0) emit FeePaid(channelId, feeRecipient, fee);
    }

    function _send(address to, uint256 amount) private {
        _callToken(abi.encodeCall(IERC20Minimal.transfer, (to, amount)));
    }

    function _pull(address from, uint256 amount) private {
        _callToken(abi.encodeCall(IERC20Minimal.transferFrom, (from, address(this), amount)));
    }

    /// @dev Calls the token; any failure (revert, `false`, malformed return data, no code)
    /// becomes TransferFailed. A token that returns nothing is accepted, as SafeERC20 does.
    function _callToken(bytes memory data) private {
        address token = usdc;
        (bool success, bytes memory ret) = token.call(data);
        bool ok = success
            && (ret.length == 0 ? token.code.length > 0 : (ret.length >= 32 && uint256(bytes32(ret)) == 1));
        if (!ok) revert TransferFailed();
    }
}
