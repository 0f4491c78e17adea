"""GET /metrics: a real scrape, parsed as Prometheus parses it, counts exactly what happened."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from helpers import ChannelFactory, Provider, ProviderFactory, RpcProxy, free_port, paid_chat, wait_for
from prometheus_client.parser import text_string_to_metric_families

from drain_provider import __version__
from drain_provider.api.state import METRICS
from drain_provider.chain import ChainClient
from drain_provider.devtools.demo_upstream import DEMO_MODEL
from drain_provider.devtools.devchain import DevChain
from drain_provider.requestinfo import RequestInfo

TOKEN = "admin-0123456789abcdef-secret"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str, token: str | None = None) -> tuple[int, Mapping[str, str], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, resp.headers, await resp.text()


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labelled(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_scrape_counts_what_happened(provider_factory: ProviderFactory, open_channel: ChannelFactory) -> None:
    provider = await provider_factory(admin_token=TOKEN)
    consumer = await open_channel(provider)
    for _ in range(2):
        await paid_chat(provider.client(), consumer)
    voucher = consumer.next_voucher(100_000)
    stream = await provider.client().chat.completions.create(
        model=DEMO_MODEL,
        messages=[{"role": "user", "content": "a stream"}],
        stream=True,
        extra_headers={"X-DRAIN-Voucher": voucher.header_value()},
    )
    async for _ in stream:
        pass
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{provider.url}/chat/completions", json={}) as resp:
            assert resp.status == 402  # refused: no voucher
        async with session.get(f"{provider.url}/no/such/route-a1b2c3?x=1") as resp:
            assert resp.status == 404
    outcomes = await provider.claimer.cycle(force=True)
    assert [o.status for o in outcomes] == ["confirmed"]
    await wait_for(lambda: provider.watcher.gas is not None and provider.watcher.gas.balance is not None)

    status, headers, text = await scrape(str(provider.server.make_url("/metrics")), TOKEN)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = samples(text)
    route = "/v1/chat/completions"
    assert labelled(found, "drain_requests_total", route=route, status="200", code="none") == 3
    assert labelled(found, "drain_requests_total", route=route, status="402", code="voucher_required") == 1
    assert labelled(found, "drain_requests_total", route="unmatched", status="404", code="not_found") == 1
    assert "a1b2c3" not in text  # a client's path never becomes a label
    totals = await provider.ledger.fetchone("SELECT SUM(cost), SUM(input_tokens), SUM(output_tokens) FROM usage")
    assert totals is not None and totals[0] > 0
    assert labelled(found, "drain_revenue_base_units_total", model=DEMO_MODEL) == totals[0]
    assert labelled(found, "drain_input_tokens_total", model=DEMO_MODEL) == totals[1]
    assert labelled(found, "drain_output_tokens_total", model=DEMO_MODEL) == totals[2]
    assert labelled(found, "drain_upstream_latency_seconds_count") == 3
    assert labelled(found, "drain_ttft_seconds_count") == 1
    assert labelled(found, "drain_ttft_seconds_bucket", le="+Inf") == 1
    assert labelled(found, "drain_claims_total", outcome="confirmed") == 1
    assert labelled(found, "drain_claims_total", outcome="failed") == 0
    assert labelled(found, "drain_reservations_held") == 0
    assert labelled(found, "drain_active_streams") == 0
    assert provider.watcher.gas is not None
    assert labelled(found, "drain_gas_balance_wei") == float(provider.watcher.gas.balance or 0) > 0
    assert labelled(found, "drain_payment_mode", mode="enforce") == 1
    assert labelled(found, "drain_payment_mode", mode="shadow") == 0
    assert ("drain_build_info", (("python", found_python(found)), ("version", __version__))) in found


def found_python(found: Samples) -> str:
    return next(dict(labels)["python"] for name, labels in found if name == "drain_build_info")


async def test_a_stream_in_flight_is_an_active_stream_and_holds_a_reservation(
    provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    provider = await provider_factory(admin_token=TOKEN)
    consumer = await open_channel(provider)
    voucher = consumer.next_voucher(100_000)
    url = str(provider.server.make_url("/metrics"))
    body = {
        "model": DEMO_MODEL,
        "messages": [{"role": "user", "content": '!demo {"token_delay": 0.05}'}],
        "stream": True,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{provider.url}/chat/completions", json=body, headers={"X-DRAIN-Voucher": voucher.header_value()}
        ) as resp,
    ):
        await resp.content.readline()  # the stream has begun
        found = samples((await scrape(url, TOKEN))[2])
        assert labelled(found, "drain_active_streams") == 1
        assert labelled(found, "drain_reservations_held") == 1
        assert labelled(found, "drain_requests_in_flight") == 2  # the stream and this scrape
        await resp.read()
    found = samples((await scrape(url, TOKEN))[2])
    assert (labelled(found, "drain_active_streams"), labelled(found, "drain_reservations_held")) == (0, 0)


async def test_the_main_port_asks_for_the_admin_token(provider_factory: ProviderFactory) -> None:
    disabled = await provider_factory()
    status, headers, _ = await scrape(str(disabled.server.make_url("/metrics")), "anything-at-all-long-enough")
    assert (status, headers["X-DRAIN-Error"]) == (403, "admin_disabled")
    provider = await provider_factory(admin_token=TOKEN)
    url = str(provider.server.make_url("/metrics"))
    for token in (None, TOKEN[:-1] + "X"):
        status, headers, text = await scrape(url, token)
        assert (status, headers["X-DRAIN-Error"]) == (401, "unauthorized")
        assert TOKEN not in text


async def test_metrics_port_serves_without_a_token_and_the_main_port_still_asks(
    provider_factory: ProviderFactory,
) -> None:
    port = free_port()
    provider = await provider_factory(admin_token=TOKEN, metrics_port=port)
    status, _, text = await scrape(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "drain_build_info" in text
    status, _, _ = await scrape(str(provider.server.make_url("/metrics")))
    assert status == 401
    await provider.server.close()  # the listener goes with the app
    try:
        await scrape(f"http://127.0.0.1:{port}/metrics")
    except aiohttp.ClientConnectionError:
        pass
    else:
        raise AssertionError("the metrics listener outlived the app")


async def test_a_model_not_sold_is_not_a_label(provider: Provider) -> None:
    metrics = provider.app[METRICS]
    info = RequestInfo("id", "/v1/chat/completions", 0.0, model="made-up-by-a-client", input_tokens=3, output_tokens=1)
    metrics.finish(info, 200, "none")
    found = samples(metrics.render().decode())
    assert labelled(found, "drain_input_tokens_total", model="other") == 3
    assert "made-up-by-a-client" not in metrics.render().decode()


async def test_chain_rpc_errors_are_counted_by_call(
    anvil_chain: DevChain, rpc_proxy: RpcProxy, provider_factory: ProviderFactory, open_channel: ChannelFactory
) -> None:
    chain_client = ChainClient.over_http(rpc_proxy.url, anvil_chain.contract)
    provider = await provider_factory(
        chain_client=chain_client, on=anvil_chain, chain_poll_interval=3600, admin_token=TOKEN
    )
    consumer = await open_channel(provider, on=anvil_chain)
    rpc_proxy.fail_calls_to = {anvil_chain.contract.lower()}  # getChannel of a channel never seen fails
    voucher = consumer.next_voucher(100_000)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{provider.url}/chat/completions",
            json={"model": DEMO_MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-DRAIN-Voucher": voucher.header_value()},
        ) as resp,
    ):
        assert resp.status == 503
    found = samples((await scrape(str(provider.server.make_url("/metrics")), TOKEN))[2])
    assert labelled(found, "drain_chain_rpc_errors_total", kind="getChannel") == 1
    route = "/v1/chat/completions"
    assert labelled(found, "drain_requests_total", route=route, status="503", code="chain_unavailable") == 1
