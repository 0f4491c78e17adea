"""Hostile bytes never make a 5xx nor a traceback: hypothesis writes raw requests (every header
we read, with bytes that are not ASCII, not UTF-8, control characters, huge values; bodies of
any bytes) to a real provider over a socket, and every answer must be a 4xx or a success, and
nothing may be logged at ERROR.

Hypothesis drives blocking sockets from a worker thread while the provider serves on the test's
event loop; the examples are derandomized so that CI runs the same ones every time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from helpers import ChannelFactory, Provider, ProviderFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drain_provider.consumer import DrainConsumer
from drain_provider.logs import quiet_bad_requests

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/admin/stats", "/v1/docs", "/health"]

# Bytes a header value may hold and aiohttp's parser lets through: visible ASCII, space, tab and
# any byte above 0x7f (not UTF-8, as often as not). Control bytes and values over 8190 bytes are
# refused by the parser itself, before our code: `parser_breakers`, in a few examples only.
visible_bytes = st.lists(st.integers(0x20, 0xFF).filter(lambda b: b != 0x7F) | st.just(9), max_size=120).map(bytes)
nasty_text = st.text(st.characters(codec=None, exclude_categories=("Cc", "Cs")), max_size=60)
nasty_bytes = nasty_text.map(lambda t: t.encode("utf-8"))
parser_breakers = st.sampled_from([b"\x1f", b"a\x00b", b"\x7f", b"\xff" * 9000])


def around(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid value with hostile bytes before, inside or after it."""
    return st.tuples(visible_bytes, st.integers(0, len(valid))).flatmap(
        lambda junk_at: st.sampled_from(
            [junk_at[0] + valid, valid + junk_at[0], valid[: junk_at[1]] + junk_at[0] + valid[junk_at[1] :]]
        )
    )


PAID = ["/v1/chat/completions", "/v1/completions"]
# Where each header we read is read: a hostile value is sent where it matters (and elsewhere).
READ_ON = {
    "X-DRAIN-Voucher": PAID,
    "Authorization": ["/v1/admin/stats"],
    "Host": [*PAID, "/v1/docs"],
    "X-Forwarded-For": PAID,
    "Content-Type": PAID,
}


def requests(voucher: bytes) -> st.SearchStrategy[tuple[str, str, dict[str, bytes]]]:
    """(method, path, headers): one header we read made hostile (random bytes, text of any code
    point, a valid value with junk in it, or long) and sent where it is read, or anywhere; the
    others absent, valid or hostile too; now and then one the HTTP parser refuses."""
    valid = {
        "X-DRAIN-Voucher": voucher,
        "Authorization": b"Bearer " + ADMIN_TOKEN.encode(),
        "Host": b"localhost:3000",
        "X-Forwarded-For": b"198.51.100.7, 10.0.0.1",
        "Content-Type": b"application/json; charset=utf-8",
    }
    long = st.sampled_from([b"\xff" * 4000, b"1.2.3.4, " * 800, b"[" * 4000])

    def hostile(name: str) -> st.SearchStrategy[bytes]:
        return st.one_of(visible_bytes, nasty_bytes, around(valid[name]), long)

    others = st.fixed_dictionaries({}, optional={name: st.just(value) | hostile(name) for name, value in valid.items()})
    breaker = st.none() | st.none() | st.none() | st.tuples(st.sampled_from(list(valid)), parser_breakers)

    def build(target: str) -> st.SearchStrategy[tuple[str, str, dict[str, bytes]]]:
        return st.tuples(
            st.sampled_from(["POST", "GET"]),
            st.sampled_from(READ_ON[target]) | st.sampled_from(PATHS),
            others,
            hostile(target),
            breaker,
        ).map(lambda r: (r[0], r[1], {**r[2], target: r[3], **({} if r[4] is None else {r[4][0]: r[4][1]})}))

    return st.sampled_from(list(valid)).flatmap(build)


def bodies() -> st.SearchStrategy[bytes]:
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
    return st.one_of(
        st.just(json.dumps(chat).encode()),
        st.just(json.dumps({"model": "demo", "prompt": "hi"}).encode()),
        st.binary(max_size=300),
        nasty_text.map(lambda t: json.dumps({**chat, "messages": [{"role": "user", "content": t}]}).encode()),
        st.dictionaries(st.text(max_size=8), st.none() | st.integers() | st.text(max_size=8), max_size=4).map(
            lambda d: json.dumps({**chat, **d}).encode()
        ),
    )


def exchange(host: str, port: int, request: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def run_examples(host: str, port: int, voucher: str, statuses: list[int]) -> None:
    @settings(
        max_examples=200,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests(voucher.encode()), body=bodies())
    def example(request: tuple[str, str, dict[str, bytes]], body: bytes) -> None:
        method, path, headers = request
        headers.setdefault("Host", b"localhost")  # without one, aiohttp refuses any HTTP/1.1 request
        lines = [f"{method} {path} HTTP/1.1".encode(), *(name.encode() + b": " + v for name, v in headers.items())]
        lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
        answer = exchange(host, port, b"\r\n".join(lines) + b"\r\n\r\n" + body)
        # HTTP/1.0: aiohttp's parser refused the request itself, in plain text (control bytes,
        # a header over 8190 bytes); every answer of ours is HTTP/1.1 with our error body.
        assert answer[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "), answer[:200]
        status = int(answer[9:12])
        statuses.append(status)
        assert status < 500, answer[:500]
        assert b"Traceback" not in answer
        if answer.startswith(b"HTTP/1.1 ") and status >= 400:
            head, _, content = answer.partition(b"\r\n\r\n")
            assert b"\r\nX-DRAIN-Error: " in head and json.loads(content)["error"]["code"], answer[:500]

    example()


@pytest.fixture
async def target(provider_factory: ProviderFactory, open_channel: ChannelFactory) -> tuple[Provider, DrainConsumer]:
    provider = await provider_factory(admin_token=ADMIN_TOKEN)
    return provider, await open_channel(provider)


async def test_hostile_headers_and_bodies(
    target: tuple[Provider, DrainConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    provider, consumer = target
    server = provider.server
    assert server.host is not None and server.port is not None
    voucher = consumer.next_voucher(10**6).header_value()
    statuses: list[int] = []
    quiet_bad_requests()  # as the serving loop does: aiohttp's parser refusals are one INFO line
    with caplog.at_level(logging.INFO):
        await asyncio.to_thread(run_examples, server.host, server.port, voucher, statuses)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert {400, 401, 402} <= set(statuses)  # the examples reached the checks they aim at
