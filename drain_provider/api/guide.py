"""The text of GET /v1/docs: how an agent with nothing else pays this provider.

DRAIN clients show an agent the first 4,000 characters, so the essentials come first, in the
order of use: where (endpoint, chain, RPC, token, contract), open a channel (the exact function
and event signatures, so a bare signer and an ABI encoder suffice), sign and send vouchers, read
costs, continue, close. Prices, the error codes and the rest follow. `tests/test_guide.py`
follows this text with eth-account alone against a real node, reading its facts out of it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from ..catalog import ENDPOINTS, Catalog, Kind, ModelRoute
from ..protocol import (
    CONSUMER_REQUEST_TYPE,
    DEPLOYMENTS,
    DOMAIN_NAME,
    DOMAIN_VERSION,
    VOUCHER_TYPE,
    ContractRef,
    format_usdc,
    keccak,
)
from .errors import ERRORS

APPROVE = "approve(address,uint256)"
OPEN = "open(address,uint256,uint256)"
CHANNEL_OPENED = "ChannelOpened(bytes32,address,address,uint256,uint256)"
COOPERATIVE_CLOSE = "cooperativeClose(bytes32,uint256,bytes)"
CLOSE = "close(bytes32)"
USDC_GETTER = "usdc()"


def selector(signature: str) -> str:
    return "0x" + keccak(signature.encode()).hex()[:8]


def topic(signature: str) -> str:
    return "0x" + keccak(signature.encode()).hex()


def rpc_hint(chain_id: int) -> str:
    """A public RPC for the known chains; the provider's own RPC_URL is never shown (it may
    carry a key)."""
    deployment = DEPLOYMENTS.get(chain_id)
    if deployment is None:
        return f"any JSON-RPC endpoint of chain {chain_id}"
    return f"{deployment.default_rpc_url} (public; any RPC of chain {chain_id} works)"


def known_usdc(chain_id: int, contracts: Sequence[ContractRef]) -> str | None:
    """The token of the chain's known deployments, when every contract served is one of them."""
    deployment = DEPLOYMENTS.get(chain_id)
    if deployment is None or any(ref.address not in (deployment.v1, deployment.v2) for ref in contracts):
        return None
    return deployment.usdc


def render_guide(
    *,
    root: str,
    provider: str,
    chain_id: int,
    contracts: Sequence[ContractRef],
    usdc: str | None,
    catalog: Catalog,
    min_channel_ttl: int,
) -> str:
    primary = contracts[0]
    deployment = DEPLOYMENTS.get(chain_id)
    chain = f"{deployment.chain_name}, chain id {chain_id}" if deployment else f"chain id {chain_id}"
    others = "".join(f"\n           {ref.address} (DrainChannel {ref.version}, also served)" for ref in contracts[1:])
    token = usdc or (
        f"the contract's {USDC_GETTER} [{selector(USDC_GETTER)}] (eth_call; the provider could not read it now)"
    )
    models = "\n".join(_model_line(name, route) for name, route in catalog.names.items())
    kinds = {route.kind for route in catalog.routes.values()}
    also = ", ".join(
        ["/v1/completions"] + [ENDPOINTS[kind].split()[1] for kind in (Kind.EMBEDDINGS, Kind.IMAGES) if kind in kinds]
    )
    close = (
        f"5. Close early and get the unspent deposit back now (V2): POST {root}/v1/close-channel with\n"
        '   {"channelId":"0x.."} answers {"finalAmount","signature"}; then, from the consumer, call\n'
        f"   {COOPERATIVE_CLOSE} [{selector(COOPERATIVE_CLOSE)}] on the contract with them; no request is\n"
        f"   served on the channel after. Or after expiry: {CLOSE} [{selector(CLOSE)}] (V1 has only that).\n"
    )
    if not any(ref.cooperative_close for ref in contracts):
        close = f"5. Close: after expiry, from the consumer, call {CLOSE} [{selector(CLOSE)}] on the contract.\n"
    return GUIDE.format(
        root=root,
        provider=provider,
        chain=chain,
        chain_id=chain_id,
        rpc=rpc_hint(chain_id),
        usdc=token,
        contract=primary.address,
        version=primary.version,
        others=others,
        approve=APPROVE,
        approve_sel=selector(APPROVE),
        open=OPEN,
        open_sel=selector(OPEN),
        min_duration=min_channel_ttl + 1,
        ttl=min_channel_ttl,
        event=CHANNEL_OPENED,
        event_topic=topic(CHANNEL_OPENED),
        domain_name=DOMAIN_NAME,
        domain_version=DOMAIN_VERSION,
        voucher_type=VOUCHER_TYPE,
        close=close,
        models=models,
        also=also,
        notes=_billing_notes(catalog),
        consumer_request=CONSUMER_REQUEST_TYPE,
        errors=_codes_by_status(),
    )


def _billing_notes(catalog: Catalog) -> str:
    """The billing rules beyond per-token, for the models that have them."""
    routes = catalog.routes.values()
    notes = []
    if any(r.kind is Kind.EMBEDDINGS for r in routes):
        notes.append("Embeddings: the input tokens the model reports, no output; reserved as counted before the call.")
    if any(r.kind is Kind.IMAGES for r in routes):
        notes.append("Images: the price per image times n (default 1), reserved first, charged when the model answers.")
    if any(r.markup is not None for r in routes):
        notes.append(
            'Pass-through ("charged the upstream\'s own cost"): the cost the upstream reports (USD taken as USDC)'
            " times the markup, rounded up, never more than the token prices of the reservation."
        )
    return "".join("\n" + textwrap.fill(note, 95) for note in notes)


def _model_line(name: str, route: ModelRoute) -> str:
    """One name sold and its price, as the guide lists it."""
    alias = f" (alias of {route.name})" if name != route.name else ""
    if route.kind is Kind.IMAGES:
        assert route.per_request is not None
        return f"  {name}: {format_usdc(route.per_request)} USDC per image (POST /v1/images/generations){alias}"
    p = route.price
    if route.kind is Kind.EMBEDDINGS:
        line = f"  {name}: {format_usdc(p.input_per_1k)} USDC per 1k input tokens (POST /v1/embeddings)"
    else:
        line = (
            f"  {name}: {format_usdc(p.input_per_1k)} USDC in / {format_usdc(p.output_per_1k)} USDC out per 1k tokens"
        )
    if route.markup is not None:
        line += f"; charged the upstream's own cost x{route.markup}, at most that"
    return line + alias


def _codes_by_status() -> str:
    by_status: dict[int, list[str]] = {}
    for code, spec in ERRORS.items():
        by_status.setdefault(spec.status, []).append(code)
    by_status.setdefault(504, []).append("upstream_error (timed out)")
    lines = [f"{status}: {', '.join(codes)}" for status, codes in sorted(by_status.items())]
    return "\n".join(textwrap.fill(line, 95, initial_indent="  ", subsequent_indent="       ") for line in lines)


GUIDE = """\
DRAIN provider: OpenAI-compatible chat completions, paid per token from a DRAIN payment channel.
Amounts are USDC base units (6 decimals: 1 USDC = 1000000), as decimal strings.

Endpoint   {root}/v1/chat/completions (also {also}), OpenAI format
Provider   {provider}
Chain      {chain}; RPC {rpc}
USDC       {usdc}
Contract   {contract} (DrainChannel {version}){others}

1. Open a channel once, from your account (the consumer), two transactions:
   on USDC:     {approve} [{approve_sel}] spender = the contract, amount = deposit
   on contract: {open} [{open_sel}] provider = {provider},
                amount = deposit, duration = seconds; at least {min_duration} (vouchers are refused in a
                channel's last {ttl} s); an hour or more is sensible
   channelId: in the open receipt, the contract's log {event}
   (channelId, consumer, provider indexed; deposit, expiry in data), whose topics[0] is
   {event_topic}: channelId = topics[1].
2. Every request carries a new EIP-712 voucher (ready-made JSON: GET {root}/v1/signing):
   domain  {{name: "{domain_name}", version: "{domain_version}", chainId: {chain_id},
            verifyingContract: the channel's contract}}
   type    {voucher_type}
   nonce = the last + 1 (first: 1); amount = CUMULATIVE: all you allow so far, previous amount + this
   request's cost at most (what is not charged stays yours for the next requests).
   Signature: 0x + 65 bytes (r, s, v), v = 27 or 28. Header, JSON with decimal strings:
   X-DRAIN-Voucher: {{"channelId":"0x..","amount":"..","nonce":"..","signature":"0x.."}}
3. Costs: answer headers X-DRAIN-Cost (this request), X-DRAIN-Total (charged on the channel),
   X-DRAIN-Remaining (deposit - total), X-DRAIN-Next-Min. A stream ("stream": true) sends them as
   comment lines before "data: [DONE]", like ": X-DRAIN-Cost: 102". Next voucher amount:
   max(X-DRAIN-Next-Min, X-DRAIN-Total + input and max_tokens at the prices below).
4. Lost count? GET {root}/v1/channels/<channelId>: status, deposit, charged, remaining, expiry,
   lastVoucher, next {{nonce, minAmount}}: sign next.nonce and at least next.minAmount.
{close}
Models (USDC; an alias is sold at its model's prices):
{models}

What you are charged: the input and output tokens the model reports, at those prices
(cost = in*inPrice//1000 + out*outPrice//1000). A request reserves its worst case (input +
max_tokens) before it runs; a voucher that leaves room for less lowers max_tokens to what it pays
for. Failed upstream calls are not charged.{notes}

Your own requests about a channel are signed by the consumer as EIP-712
{consumer_request}, same domain, timestamp = unix seconds
(within 300 s): action "usage" for GET {root}/v1/channels/<channelId>/usage?timestamp=..&signature=0x..
(per-request history), action "close" as "timestamp" and "signature" in the close-channel body
(a provider that requires it answers 401 consumer_signature_required without them).

Errors: JSON {{"error": {{"message", "type", "code"}}}} plus header X-DRAIN-Error.
insufficient_funds comes with X-DRAIN-Required (the cumulative amount needed) and
X-DRAIN-Provided; channel_expiring means: open a new channel; rate_limited (429: too many
refused payments from your address) comes with Retry-After, the seconds to wait. Codes by status:
{errors}

Other endpoints: GET {root}/v1/models, GET {root}/v1/pricing, GET {root}/v1/signing, GET {root}/health.
Python: the drain_provider package's DrainConsumer opens channels and signs vouchers for you.
"""
