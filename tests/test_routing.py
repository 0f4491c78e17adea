"""Models and upstreams (MODELS_FILE) through the real app: two local OpenAI-format upstreams,
routed by model, each with its own key; /v1/models and /v1/pricing list exactly the file;
embeddings and images through the openai SDK, charged as the ledger says; pass-through billing on
the upstream's usage.cost; a reload swaps the routes; a bad file stops the start."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer
from helpers import ChannelFactory, Provider, ProviderFactory, Upstream, call, paid_chat
from test_startup import cli, one_line

from drain_provider.api import reload_prices
from drain_provider.catalog import Catalog, read_catalog
from drain_provider.consumer import DrainConsumer
from drain_provider.devtools.demo_upstream import DEMO_STATS, create_demo_upstream
from drain_provider.states import PaymentMode
from drain_provider.tokens import TokenCounter

KEYS = {"KEY_ONE": "sk-one-0123456789", "KEY_TWO": "sk-two-0123456789", "KEY_THREE": "sk-three-0123456789"}

MODELS = """
[upstreams.one]
base_url = "{one}"
api_key_env = "KEY_ONE"
[upstreams.two]
base_url = "{two}"
api_key_env = "KEY_TWO"

[models.alpha]
upstream = "one"
upstream_model = "demo-one"
price = {{ input = 1000, output = 2000 }}
[models.beta]
upstream = "two"
upstream_model = "demo-two"
aliases = ["b"]
price = {{ input = 1000, output = 2000 }}
markup = "1.5"
[models.vec]
upstream = "two"
upstream_model = "embed-x"
kind = "embeddings"
price = {{ input = 100000 }}
[models.pic]
upstream = "one"
kind = "images"
per_request = 40000
"""


@pytest.fixture
async def second(aiohttp_server: Any) -> Upstream:
    app = create_demo_upstream()
    server: TestServer = await aiohttp_server(app)
    return Upstream(server, app[DEMO_STATS])


def catalog_file(tmp_path: Path, one: Upstream, two: Upstream, text: str = MODELS) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text.format(one=one.url, two=two.url))
    return path


async def routed(provider_factory: ProviderFactory, path: Path) -> Provider:
    catalog: Catalog = read_catalog(path, KEYS)
    return await provider_factory(routing=catalog, prices=catalog.prices, models_file=path)


@pytest.fixture
async def provider(provider_factory: ProviderFactory, upstream: Upstream, second: Upstream, tmp_path: Path) -> Provider:
    return await routed(provider_factory, catalog_file(tmp_path, upstream, second))


async def usage_rows(provider: Provider, consumer: DrainConsumer) -> list[tuple[Any, ...]]:
    return await provider.ledger.fetchall(
        "SELECT endpoint, model, status, reserved, input_tokens, output_tokens, usage_source, price_cost, cost "
        "FROM usage WHERE channel_id = ? ORDER BY id",
        (consumer.channel_id,),
    )


async def test_each_model_goes_to_its_upstream_with_its_own_key(
    provider: Provider, upstream: Upstream, second: Upstream, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    alpha = await paid_chat(client, consumer, model="alpha")
    assert alpha.parse().model == "alpha"  # the public name, not the upstream's
    assert upstream.stats.requests[-1]["model"] == "demo-one"
    assert upstream.stats.authorizations == ["Bearer sk-one-0123456789"] * len(upstream.stats.authorizations)
    beta = await paid_chat(client, consumer, model="b", stream=False)
    assert beta.parse().model == "b" and second.stats.requests[-1]["model"] == "demo-two"
    stream = await client.chat.completions.create(
        model="b",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(100_000).header_value()},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks and {chunk.model for chunk in chunks} == {"b"}
    # Each key went to its own upstream only.
    assert set(second.stats.authorizations) == {"Bearer sk-two-0123456789"}
    assert set(upstream.stats.authorizations) == {"Bearer sk-one-0123456789"}
    rows = await usage_rows(provider, consumer)
    assert [(row[1], row[2]) for row in rows] == [("alpha", "ok"), ("beta", "ok"), ("beta", "ok")]


async def test_models_and_pricing_list_exactly_the_file(provider: Provider) -> None:
    status, models, _ = await call(provider, "GET", "/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["alpha", "b", "beta", "pic", "vec"]
    _, pricing, _ = await call(provider, "GET", "/pricing")
    assert (pricing["defaultMaxTokens"], pricing["minOutputTokens"]) == (4096, 16)
    assert pricing["models"] == {
        "alpha": {"inputPer1kTokens": "0.001", "outputPer1kTokens": "0.002"},
        "beta": {"inputPer1kTokens": "0.001", "outputPer1kTokens": "0.002", "markup": "1.5", "billing": "pass-through"},
        "b": {
            "inputPer1kTokens": "0.001",
            "outputPer1kTokens": "0.002",
            "markup": "1.5",
            "billing": "pass-through",
            "aliasOf": "beta",
        },
        "vec": {"inputPer1kTokens": "0.1", "outputPer1kTokens": "0", "kind": "embeddings"},
        "pic": {"perRequest": "0.04", "billing": "per-request", "kind": "images"},
    }
    _, health, _ = await call(provider, "GET", "/../health")
    assert set(health["upstreams"]) == {"one", "two"} and health["models"] == 5
    guide = (await call_text(provider, "/docs")).split("Models (USDC", 1)[1]
    assert "  b: 0.001 USDC in / 0.002 USDC out per 1k tokens; charged the upstream's own cost x1.5" in guide
    assert "  pic: 0.04 USDC per image (POST /v1/images/generations)" in guide
    assert "  vec: 0.1 USDC per 1k input tokens (POST /v1/embeddings)" in guide
    assert "gpt-4o" not in guide


async def call_text(provider: Provider, path: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(provider.url + path) as response:
        return await response.text()


async def test_embeddings_through_the_openai_sdk(
    provider: Provider, second: Upstream, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    costs = []
    for value in ("hello world", ["one", "two three"], [1, 2, 3, 4], [[1, 2], [3]]):
        raw = await client.embeddings.with_raw_response.create(
            model="vec", input=value, extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(1_000_000).header_value()}
        )
        consumer.record(raw.headers)
        answer = raw.parse()
        assert answer.model == "vec" and len(answer.data[0].embedding) == 8  # base64, decoded by the SDK
        assert (
            second.stats.requests[-1]["encoding_format"] == "base64" and second.stats.requests[-1]["model"] == "embed-x"
        )
        expected = TokenCounter().count_prompt("vec", value)
        assert answer.usage.prompt_tokens == expected
        costs.append(int(raw.headers["X-DRAIN-Cost"]))
        assert costs[-1] == expected * 100
    rows = await usage_rows(provider, consumer)
    assert [row[8] for row in rows] == costs and {row[:3] for row in rows} == {("/embeddings", "vec", "ok")}
    assert {row[6] for row in rows} == {"upstream"} and [row[5] for row in rows] == [0, 0, 0, 0]
    # A model sold on another endpoint, and bad inputs: 400, nothing stored.
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "alpha", "input": "x"}, "model_not_supported"),
        ({"model": "vec", "input": []}, "invalid_request"),
        ({"model": "vec", "input": [1, "x"]}, "invalid_request"),
        ({"model": "vec", "input": ""}, "invalid_request"),
    ]
    for kwargs, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(
                **kwargs, extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(1_000_000).header_value()}
            )
        assert info.value.response.headers["X-DRAIN-Error"] == code
    with pytest.raises(openai.BadRequestError) as info:
        await paid_chat(client, consumer, model="vec")
    assert "POST /v1/embeddings" in info.value.message
    assert len(await usage_rows(provider, consumer)) == 4


async def test_images_through_the_openai_sdk(provider: Provider, open_channel: ChannelFactory) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    raw = await client.images.with_raw_response.generate(
        model="pic",
        prompt="a cat",
        n=2,
        extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(80_000).header_value()},
    )
    consumer.record(raw.headers)
    assert len(raw.parse().data or []) == 2 and raw.headers["X-DRAIN-Cost"] == "80000"
    assert raw.headers["X-DRAIN-Next-Min"] == str(80_000 + 80_000)
    # Too little for n images: 402 before the upstream is called.
    with pytest.raises(openai.APIStatusError) as refused:
        await client.images.generate(
            model="pic", prompt="a cat", extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(39_999).header_value()}
        )
    assert refused.value.status_code == 402 and refused.value.response.headers["X-DRAIN-Required"] == "120000"
    # An upstream failure is not charged.
    with pytest.raises(openai.APIStatusError) as failed:
        await client.images.generate(
            model="pic",
            prompt='!demo {"status": 500}',
            extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(40_000).header_value()},
        )
    assert failed.value.status_code == 502
    rows = await usage_rows(provider, consumer)
    assert [(row[0], row[2], row[3], row[6], row[8]) for row in rows] == [
        ("/images/generations", "ok", 80000, "per_request", 80000),
        ("/images/generations", "failed", 40000, None, 0),
    ]
    with pytest.raises(openai.BadRequestError):
        await client.images.generate(
            model="pic", prompt="x", n=11, extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(0).header_value()}
        )


async def test_pass_through_charges_the_reported_cost_times_the_markup(
    provider: Provider, open_channel: ChannelFactory
) -> None:
    consumer = await open_channel(provider)
    client = provider.client()
    # 0.000123 USD = 123 base units, x1.5 = 184.5: rounded up.
    json_answer = await paid_chat(client, consumer, model="beta", content='!demo {"cost": 0.000123}')
    assert json_answer.headers["X-DRAIN-Cost"] == "185"
    stream = await client.chat.completions.with_raw_response.create(
        model="b",
        messages=[{"role": "user", "content": '!demo {"cost": 0.0001}'}],
        stream=True,
        extra_headers={"X-DRAIN-Voucher": consumer.next_voucher(100_000).header_value()},
    )
    text = (await stream.http_response.aread()).decode()
    assert ": X-DRAIN-Cost: 150\n" in text
    # An absurd cost is capped at the reservation; no cost reported: the token prices.
    absurd = await paid_chat(client, consumer, model="beta", content='!demo {"cost": 1e300}', max_tokens=50)
    plain = await paid_chat(client, consumer, model="beta")
    rows = await usage_rows(provider, consumer)
    assert [(row[6], row[7], row[8]) for row in rows[:2]] == [("upstream_cost", 185, 185), ("upstream_cost", 150, 150)]
    reserved = rows[2][3]
    assert rows[2][6:] == ("upstream_cost", 2**63 - 1, reserved) and absurd.headers["X-DRAIN-Cost"] == str(reserved)
    assert rows[3][6] == "upstream" and rows[3][8] == (rows[3][4] * 1000 + rows[3][5] * 2000) // 1000 > 0
    assert plain.headers["X-DRAIN-Cost"] == str(rows[3][8])


async def test_a_reload_swaps_the_routes_and_a_bad_file_keeps_them(
    provider: Provider,
    upstream: Upstream,
    second: Upstream,
    open_channel: ChannelFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = await open_channel(provider)
    path = provider.settings.models_file
    assert path is not None
    env = {"MODELS_FILE": str(path), **KEYS}
    path.write_text(
        f"""
[upstreams.three]
base_url = "{second.url}"
api_key_env = "KEY_THREE"
[models.gamma]
upstream_model = "demo-three"
aliases = ["g"]
price = {{ input = 1000, output = 2000 }}
"""
    )
    await reload_prices(provider.app, env)
    _, models, _ = await call(provider, "GET", "/models")
    assert [m["id"] for m in models["data"]] == ["g", "gamma"]
    await paid_chat(provider.client(), consumer, model="g")
    assert (
        second.stats.requests[-1]["model"] == "demo-three"
        and second.stats.authorizations[-1] == "Bearer sk-three-0123456789"
    )
    with pytest.raises(openai.BadRequestError):
        await paid_chat(provider.client(), consumer, model="alpha")
    path.write_text("[models.broken]\nprice = 1\n")
    with caplog.at_level(logging.WARNING):
        await reload_prices(provider.app, env)
    assert "prices_reload_failed error=MODELS_FILE: upstreams: at least one upstream is required" in caplog.text
    _, models, _ = await call(provider, "GET", "/models")
    assert [m["id"] for m in models["data"]] == ["g", "gamma"]
    _, health, _ = await call(provider, "GET", "/../health")
    assert set(health["upstreams"]) == {"three"}


def test_a_bad_models_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "upstreams:\n  one:\n    base_url: http://127.0.0.1:9/v1\n    api_key_env: NOT_SET_ANYWHERE\n"
        "models:\n  m:\n    price: {input: 1, output: 1}\n"
    )
    env = {"PROVIDER_PRIVATE_KEY": "0x" + "11" * 32, "CHAIN_ID": "137", "MODELS_FILE": str(path)}
    line = one_line(cli([], env, tmp_path), "MODELS_FILE: upstreams.one.api_key_env")
    assert "NOT_SET_ANYWHERE is not set" in line


@pytest.mark.parametrize("mode", [PaymentMode.SHADOW, PaymentMode.OFF])
async def test_embeddings_and_images_follow_the_payment_mode(
    provider_factory: ProviderFactory, upstream: Upstream, second: Upstream, tmp_path: Path, mode: PaymentMode
) -> None:
    """The rollout modes live in the one paid flow (api/paid.begin): the endpoints beside chat
    serve a request without a voucher free, and nothing reaches the ledger."""
    path = catalog_file(tmp_path, upstream, second)
    catalog: Catalog = read_catalog(path, KEYS)
    provider = await provider_factory(routing=catalog, prices=catalog.prices, models_file=path, payment_mode=mode)
    client = provider.client()
    vectors = await client.embeddings.with_raw_response.create(model="vec", input="hello world")
    images = await client.images.with_raw_response.generate(model="pic", prompt="a cat", n=2)
    for raw in (vectors, images):
        assert raw.http_response.status_code == 200
        assert "X-DRAIN-Cost" not in raw.headers and "X-DRAIN-Channel" not in raw.headers
    assert len(images.parse().data or []) == 2 and len(vectors.parse().data[0].embedding) == 8
    row = await provider.ledger.fetchone("SELECT (SELECT COUNT(*) FROM usage), (SELECT COUNT(*) FROM vouchers)")
    assert row == (0, 0)
