"""Hostile HTTP requests for the fuzz scenario: one grammar, two engines.

The grammar is written against `Draw`, a handful of choices (an integer, one of some options,
bytes, text). `HypothesisDraw` makes each choice through Hypothesis (`st.data()`), so that a
failing request is shrunk to a small one; `RandomDraw` makes it with a seeded `random.Random`,
about a hundred times faster, for the long run's hundred thousand inputs. Sizes that Hypothesis
could not draw byte by byte (a megabyte, 100,000 brackets) are a drawn size and a short drawn
pattern repeated.

Four families of requests, each one a `Probe`:
- `paid`: well-formed HTTP to the paid endpoints, bodies near the OpenAI schema and far from it
  (wrong types, deep nesting, huge numbers, invalid UTF-8, up to the body limit), and vouchers of
  every kind: none, malformed, a bad signature, signed by a stranger for a real channel, for no
  channel, above the deposit, replayed, and valid (the only ones that may be answered 200);
- `free`: any method on the free endpoints and on made-up paths;
- `admin`: the admin API with wrong Authorization headers, non-UTF-8 bytes included;
- `http`: malformed HTTP: request lines, header names and values, framing, sizes.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from hypothesis import strategies as st

from drain_provider.protocol import SECP256K1_N, Domain, Voucher, sign_voucher

T = TypeVar("T")

FREE_PATHS = ("/v1/models", "/v1/pricing", "/health", "/v1/signing", "/v1/docs")
PAID_PATHS = ("/v1/chat/completions", "/v1/completions")
ADMIN_PATHS = ("/v1/admin/stats", "/v1/admin/vouchers", "/v1/admin/channels", "/v1/admin/claims", "/v1/admin/claim")
METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE")  # methods llhttp knows
LONE_SURROGATES = ("\ud800", "\udfff", "\udc80")  # invalid UTF-8 when encoded as it is
TOKEN_CHARS = string.ascii_letters + string.digits + "-_."
VOUCHER_KINDS = ("none", "malformed", "malformed", "bad_signature", "stranger", "no_channel", "over_deposit",
                 "replayed", "valid", "valid", "valid")  # fmt: skip


class Draw(Protocol):
    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def raw(self, max_size: int) -> bytes: ...

    def text(self, max_size: int) -> str: ...


class RandomDraw:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return self.rng.choice(options)

    def raw(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))

    def text(self, max_size: int) -> str:
        ranges = ((32, 126), (32, 126), (32, 126), (0, 31), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD),
                  (0x1F300, 0x1FAFF))  # fmt: skip
        text = "".join(chr(self.rng.randint(*self.rng.choice(ranges))) for _ in range(self.rng.randint(0, max_size)))
        return text + self.rng.choice(LONE_SURROGATES) if self.rng.random() < 0.02 else text


class HypothesisDraw:
    characters = st.characters()  # every character but the surrogates; a lone one is added now and then

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def raw(self, max_size: int) -> bytes:
        return self.data.draw(st.binary(max_size=max_size))

    def text(self, max_size: int) -> str:
        text = self.data.draw(st.text(self.characters, max_size=max_size))
        return text + self.choice(LONE_SURROGATES) if self.integer(0, 49) == 0 else text


def chance(draw: Draw, percent: int) -> bool:
    return draw.integer(0, 99) < percent


def blob(draw: Draw, size: int) -> bytes:
    """`size` bytes: a short drawn pattern, repeated."""
    pattern = draw.raw(8) or b"x"
    return (pattern * (size // len(pattern) + 1))[:size]


def big(draw: Draw, limit: int) -> int:
    """A size anywhere from 0 to `limit`, spread over the orders of magnitude."""
    return draw.integer(0, 10 ** draw.integer(0, len(str(limit)) - 1)) % (limit + 1)


def field_value(raw: bytes) -> bytes:
    """Bytes an HTTP header value may hold (visible ASCII, tab, space, obs-text 0x80-0xFF): the
    other families' requests stay well-formed HTTP, hostile only in what they say."""
    return bytes(b if b == 9 or 32 <= b <= 126 or b >= 128 else 63 for b in raw)


def token(draw: Draw, max_size: int = 20) -> str:
    return "".join(draw.choice(TOKEN_CHARS) for _ in range(draw.integer(1, max_size)))


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate stays, as invalid UTF-8


# --- what the fuzzer knows of its target ----------------------------------------------------------


@dataclass
class Target:
    """The channels a run fuzzes with: its own (it holds the consumer key) and a stranger's."""

    domain: Domain
    channel: str
    key: bytes
    deposit: int
    victim: str  # another consumer's channel: nothing signed here may ever pay on it
    nonce: int = 0
    amount: int = 0
    accepted: list[Voucher] = field(default_factory=list)  # valid vouchers answered 200

    def sign(self, channel: str, amount: int, nonce: int) -> Voucher:
        return sign_voucher(self.key, self.domain, channel, amount, nonce)

    def fresh(self) -> Voucher:
        self.nonce += 1
        self.amount += 10_000
        return self.sign(self.channel, self.amount, self.nonce)


@dataclass
class Probe:
    family: str
    method: bytes
    target: bytes  # the request target: path and query, bytes as sent
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    voucher: str = "none"  # the kind of X-DRAIN-Voucher sent
    signed: Voucher | None = None  # the voucher of a `valid` one
    chunked: bool = False
    via_client: bool = False  # sent with aiohttp's client rather than as raw bytes
    wire_bytes: bytes | None = None  # the `http` family: the exact bytes, framing and all

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    def wire(self) -> bytes:
        if self.wire_bytes is not None:
            return self.wire_bytes
        lines = [self.method + b" " + self.target + b" HTTP/1.1", *(k + b": " + v for k, v in self.headers)]
        body = self.body
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join([*lines, b"Connection: close", b"", b""]) + body

    def brief(self) -> str:
        """The request, shortened, for a report (long values cut, bytes shown escaped)."""
        wire = self.wire()
        return f"{self.family}/{self.voucher}{'/client' if self.via_client else ''}: {wire[:300]!r}" + (
            f" ... ({len(wire)} bytes)" if len(wire) > 300 else ""
        )


def probe(draw: Draw, target: Target, family: str | None = None) -> Probe:
    family = family or draw.choice(("paid", "paid", "paid", "paid", "free", "admin", "http", "http"))
    return FAMILIES[family](draw, target)


# --- JSON values and bodies -------------------------------------------------------------------


def value(draw: Draw, depth: int = 2) -> Any:
    kind = draw.choice(("null", "bool", "int", "float", "text", "text", "list", "dict"))
    if kind == "null":
        return None
    if kind == "bool":
        return draw.choice((True, False))
    if kind == "int":
        return draw.choice((0, 1, -1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30, draw.integer(-1000, 10**6)))
    if kind == "float":
        return draw.choice((0.5, -0.0, 1e308, 1e-308, 3.0, 1.7976931348623157e308))
    if kind == "text" or depth <= 0:
        return draw.text(40)
    if kind == "list":
        return [value(draw, depth - 1) for _ in range(draw.integer(0, 3))]
    return {draw.text(10): value(draw, depth - 1) for _ in range(draw.integer(0, 3))}


def content(draw: Draw) -> Any:
    kind = draw.choice(("text", "text", "text", "parts", "value", "long"))
    if kind == "text":
        return draw.text(200)
    if kind == "long":
        return blob(draw, big(draw, 200_000)).decode("latin-1")
    if kind == "parts":
        return [
            {
                "type": draw.choice(("text", "text", "image_url", "input_audio", draw.text(8))),
                "text": draw.text(50) if chance(draw, 80) else value(draw),
                **({"image_url": value(draw)} if chance(draw, 20) else {}),
            }
            for _ in range(draw.integer(0, 3))
        ]
    return value(draw)


def message(draw: Draw) -> Any:
    if chance(draw, 5):
        return value(draw)
    msg: dict[str, Any] = {
        "role": draw.choice(("user", "user", "system", "assistant", "tool", "developer", draw.text(8))),
        "content": content(draw),
    }
    if chance(draw, 10):
        msg.pop(draw.choice(("role", "content")))
    if chance(draw, 10):
        msg[draw.choice(("name", "tool_calls", "tool_call_id", draw.text(8)))] = value(draw)
    return msg


OPTIONAL_FIELDS: dict[str, Callable[[Draw], Any]] = {
    "max_tokens": lambda d: d.choice((1, 16, 64, 0, -1, 2**31, 2**63, 10**30, 1.5, "64", True, None)),
    "max_completion_tokens": lambda d: d.choice((16, 0, -5, 2**64, "x", None)),
    "stream": lambda d: d.choice((True, False, True, "true", 1, None)),
    "stream_options": lambda d: d.choice(({"include_usage": True}, {"include_usage": "yes"}, [], None)),
    "temperature": lambda d: d.choice((0, 0.7, 2.5, -1, "hot", None)),
    "n": lambda d: d.choice((1, 2, 0, 128, -1, "2")),
    "tools": value,
    "tool_choice": value,
    "response_format": value,
    "stop": value,
    "logprobs": value,
    "user": value,
}


def request_object(draw: Draw, legacy: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw.choice(("demo",) * 6 + ("gpt-4o", "", "no-such-model", None, 7))}
    if legacy:
        body["prompt"] = draw.choice((draw.text(100), [draw.text(20)], [1, 2, 3], [[1, 2]], value(draw)))
    else:
        body["messages"] = [message(draw) for _ in range(draw.integer(0 if chance(draw, 5) else 1, 4))]
        if chance(draw, 5):
            body["messages"] = value(draw)
    for name, make in OPTIONAL_FIELDS.items():
        if chance(draw, 15):
            body[name] = make(draw)
    if chance(draw, 5):
        body.pop(draw.choice(("model", "prompt" if legacy else "messages")))
    if chance(draw, 10):
        body[draw.text(12)] = value(draw)
    return body


def serialise(draw: Draw, obj: Any) -> bytes:
    if chance(draw, 50):
        return json.dumps(obj).encode()  # \\u escapes, lone surrogates included
    return encode(json.dumps(obj, ensure_ascii=False))


def deep(draw: Draw) -> bytes:
    depth = big(draw, 200_000)
    opener, closer = draw.choice(((b"[", b"]"), (b'{"a":', b"}")))
    nested = opener * depth + b"1" + closer * depth
    if chance(draw, 50):
        return b'{"model":"demo","messages":[{"role":"user","content":' + nested + b"}]}"
    return nested


def body_bytes(draw: Draw, legacy: bool) -> bytes:
    shape = draw.choice(("request",) * 12 + ("value", "deep", "number", "invalid_utf8", "truncated", "bom", "empty",
                                              "huge", "nan"))  # fmt: skip
    if shape == "value":
        return serialise(draw, value(draw, 3))
    if shape == "deep":
        return deep(draw)
    if shape == "number":
        digits = b"9" * draw.integer(1, 20_000)
        return b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"max_tokens":' + digits + b"}"
    if shape == "empty":
        return b""
    if shape == "nan":
        return (
            b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"temperature":'
            + draw.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0"))
            + b"}"
        )
    raw = serialise(draw, request_object(draw, legacy))
    if shape == "invalid_utf8":
        at = draw.integer(0, len(raw))
        return raw[:at] + draw.choice((b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80")) + raw[at:]
    if shape == "truncated":
        return raw[: draw.integer(0, len(raw))]
    if shape == "bom":
        return b"\xef\xbb\xbf" + raw
    if shape == "huge":  # around the 1 MiB body limit, on both sides
        size, unit = draw.integer(1_000_000, 1_100_000), draw.raw(8).hex() or "ab"
        return raw[:-1] + b',"padding":"' + (unit * (size // len(unit) + 1))[:size].encode() + b'"}'
    return raw


# --- vouchers -----------------------------------------------------------------------------------


def bad_signature(draw: Draw) -> bytes:
    kind = draw.choice(("random", "high_s", "odd_v", "zero"))
    if kind == "zero":
        return bytes(65)
    r = draw.raw(32).rjust(32, b"\x01")
    s = draw.integer(1, SECP256K1_N - 1)
    if kind == "high_s":
        s = SECP256K1_N - draw.integer(1, SECP256K1_N // 2 - 1)
    v = draw.choice((27, 28, 0, 1)) if kind != "odd_v" else draw.choice((2, 26, 29, 255))
    return r + s.to_bytes(32, "big") + bytes([v])


def voucher_json(draw: Draw, voucher: Voucher) -> bytes:
    """A voucher's JSON as some client might write it; every one of these parses to `voucher`."""
    fields: dict[str, Any] = voucher.to_json()
    style = draw.choice(("compact", "compact", "compact", "numbers", "reordered", "spaced"))
    if style == "numbers":
        fields = {**fields, "amount": voucher.amount, "nonce": voucher.nonce}
    elif style == "reordered":
        fields = dict(reversed(list(fields.items())))
    return json.dumps(fields, separators=(", ", ": ") if style == "spaced" else (",", ":")).encode()


def malformed_voucher(draw: Draw, target: Target) -> bytes:
    good = target.sign(target.channel, target.amount + 1, target.nonce + 1).to_json()
    kind = draw.choice(("text", "bytes", "fields", "tweak", "tweak", "deep", "long"))
    if kind == "text":
        return field_value(encode(draw.text(200)))
    if kind == "bytes":
        return field_value(draw.raw(200))
    if kind == "fields":
        keys = ["channelId", "amount", "nonce", "signature", draw.text(6)]
        return field_value(serialise(draw, {k: value(draw, 1) for k in keys if chance(draw, 70)}))
    if kind == "deep":
        depth = draw.integer(1, 3000)
        return b"[" * depth + b"]" * depth
    if kind == "long":
        return b'{"channelId":"' + blob(draw, draw.integer(1000, 7000)).hex().encode()[:7000] + b'"}'
    name = draw.choice(("channelId", "amount", "nonce", "signature"))
    tweaked: Any = draw.choice(("01", "1.5", "-1", str(2**256), "0x10", "abc", "", "0x" + "ab" * 31, "0X" + "ab" * 32,
                           "0x" + "zz" * 65, "0x" + "00" * 64, None, 1.5, True, [], {}))  # fmt: skip
    text = json.dumps({**good, name: tweaked})
    if chance(draw, 20):  # a key twice: the second would win in most parsers
        text = text[:-1] + f', "{name}": "{good[name]}"' + "}"
    return text.encode()


def voucher(draw: Draw, target: Target) -> tuple[str, bytes | None, Voucher | None]:
    """The kind of voucher drawn, the header's value, and the voucher if it is a valid one."""
    kind = draw.choice(VOUCHER_KINDS)
    if kind == "replayed" and not target.accepted:
        kind = "none"
    if kind == "none":
        return kind, None, None
    if kind == "malformed":
        return kind, malformed_voucher(draw, target), None
    if kind == "valid":
        signed = target.fresh()
        return kind, voucher_json(draw, signed), signed
    return kind, voucher_json(draw, _invalid(draw, target, kind)), None


def _invalid(draw: Draw, target: Target, kind: str) -> Voucher:
    amount, nonce = target.amount + draw.integer(1, 10_000), target.nonce + draw.integer(1, 3)
    if kind == "bad_signature":
        return Voucher(target.channel, amount, nonce, bad_signature(draw))
    if kind == "stranger":  # a real channel, signed by someone who is not its consumer
        return target.sign(target.victim, amount, nonce)
    if kind == "no_channel":
        return target.sign("0x" + draw.raw(32).rjust(32, b"\x07").hex(), amount, nonce)
    if kind == "over_deposit":
        return target.sign(target.channel, target.deposit + draw.integer(1, 10**30), nonce)
    return draw.choice(target.accepted)  # replayed


# --- the families -------------------------------------------------------------------------------


def extra_headers(draw: Draw, most: int = 4) -> list[tuple[bytes, bytes]]:
    headers = []
    for _ in range(draw.integer(0, most)):
        name = draw.choice(("Accept", "Accept-Encoding", "Cookie", "X-Forwarded-For", "Range",
                            "Content-Encoding", "X-DRAIN-Voucher", token(draw)))  # fmt: skip
        size = draw.choice((20, 200, 4000))
        headers.append(
            (
                name.encode(),
                field_value(blob(draw, draw.integer(0, size)) if chance(draw, 20) else encode(draw.text(size // 10))),
            )
        )
    return headers


def path_variant(draw: Draw, path: str) -> bytes:
    kind = draw.choice(("as_is", "as_is", "slash", "double", "upper", "query", "encoded", "dots"))
    variants = {
        "as_is": path,
        "slash": path + "/",
        "double": path.replace("/", "//", 1),
        "upper": path.upper(),
        "query": path + "?" + token(draw) + "=" + token(draw),
        "encoded": "/" + path[1:].replace("/", "%2F", draw.integer(1, 2)),
        "dots": "/v1/../" + path.lstrip("/"),
    }
    return variants[kind].encode()


def paid(draw: Draw, target: Target) -> Probe:
    path = draw.choice(PAID_PATHS)
    method = b"POST" if chance(draw, 90) else draw.choice(METHODS)
    kind, header, signed = voucher(draw, target)
    headers = [(b"Host", b"127.0.0.1")]
    content_type = draw.choice((b"application/json", b"application/json", b"text/plain", b"", b"text/x-www-form"))
    if content_type:
        headers.append((b"Content-Type", content_type))
    if header is not None:
        headers.append((b"X-DRAIN-Voucher", header))
    headers += extra_headers(draw)
    return Probe(
        "paid",
        method,
        path_variant(draw, path) if chance(draw, 15) else path.encode(),
        headers,
        body_bytes(draw, legacy=path == "/v1/completions"),
        kind,
        signed,
        chunked=chance(draw, 5),
        via_client=chance(draw, 20),
    )


def made_up_path(draw: Draw) -> bytes:
    parts = []
    for _ in range(draw.integer(1, 6)):
        kind = draw.choice(("token", "token", "percent", "dots", "empty", "long"))
        if kind == "token":
            parts.append(token(draw).encode())
        elif kind == "percent":
            parts.append(b"".join(b"%%%02X" % byte for byte in draw.raw(6)))
        elif kind == "dots":
            parts.append(draw.choice((b"..", b".", b"%2e%2e")))
        elif kind == "long":
            parts.append(b"a" * draw.integer(100, 6000))
        else:
            parts.append(b"")
    return (b"/" + b"/".join(parts))[:7000]  # a request line stays within aiohttp's 8190 bytes


def free(draw: Draw, target: Target) -> Probe:
    path = draw.choice(FREE_PATHS).encode() if chance(draw, 60) else made_up_path(draw)
    if chance(draw, 20):
        path += b"?" + b"&".join(
            token(draw).encode() + b"=" + made_up_path(draw)[:50] for _ in range(draw.integer(1, 3))
        )
    method = draw.choice((b"GET", b"GET", b"GET", *METHODS))
    headers = [(b"Host", b"127.0.0.1"), *extra_headers(draw)]
    body = draw.raw(100) if chance(draw, 20) else b""
    return Probe("free", method, path, headers, body, via_client=chance(draw, 20))


def authorization(draw: Draw) -> bytes | None:
    kind = draw.choice(("none", "random", "scheme", "bytes", "bytes", "huge", "empty"))
    if kind == "none":
        return None
    if kind == "random":
        return b"Bearer " + token(draw, 64).encode()
    if kind == "scheme":
        return draw.choice((b"Basic YWRtaW46YWRtaW4=", b"bearer", b"Bearer", b"Token abc", b"Bearer  a  b"))
    if kind == "bytes":  # not UTF-8
        return b"Bearer " + field_value(draw.raw(40)) + draw.choice((b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"))
    if kind == "huge":
        return b"Bearer " + b"a" * draw.integer(1000, 7000)
    return b""


def admin(draw: Draw, target: Target) -> Probe:
    path = draw.choice(ADMIN_PATHS).encode()
    if chance(draw, 30):
        path += (
            b"?status=" + draw.choice((b"pending", b"confirmed", b"x", b"%ff", b"")) + b"&force=" + token(draw).encode()
        )
    method = draw.choice((b"GET", b"GET", b"POST", b"POST", *METHODS))
    headers = [(b"Host", b"127.0.0.1")]
    auth = authorization(draw)
    if auth is not None:
        headers.append((b"Authorization", auth))
    headers += extra_headers(draw, 2)
    return Probe("admin", method, path, headers, b"", via_client=chance(draw, 10) and (auth or b"").isascii())


@dataclass
class Wire:
    """A request's parts before they are joined, for `malformed_http` to spoil one of them."""

    line: bytes
    headers: list[bytes]
    framing: list[bytes]
    body: bytes
    end: bytes = b"\r\n"

    def join(self) -> bytes:
        return self.end.join([self.line, *self.headers, *self.framing, b"", b""]) + self.body


def _request_line(draw: Draw, wire: Wire) -> None:
    line, path = wire.line, wire.line.split(b" ")[1]
    wire.line = draw.choice((draw.raw(60).replace(b"\r\n", b""), b"POST", b"POST " + path, line + b" extra",
                             line.lower(), b"P\x00ST " + path + b" HTTP/1.1", b"POST  " + path + b" HTTP/1.1",
                             b"POST http://127.0.0.1" + path + b" HTTP/1.1", b"OPTIONS * HTTP/1.1",
                             b"CONNECT 127.0.0.1:1 HTTP/1.1", b"POST " + path + b"\xff HTTP/1.1",
                             b"FOO " + path + b" HTTP/1.1", b"PROPFIND " + path + b" HTTP/1.1",
                             b"POST %2F" + path[1:] + b" HTTP/1.1"))  # fmt: skip


def _version(draw: Draw, wire: Wire) -> None:
    version = draw.choice((b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1x", b"HTTPS/1.1", b"HTTP/1"))
    wire.line = wire.line.rsplit(b" ", 1)[0] + b" " + version


def _header(*choices: bytes) -> Callable[[Draw, Wire], None]:
    def add(draw: Draw, wire: Wire) -> None:
        wire.headers.append(draw.choice(choices))

    return add


def _long_line(draw: Draw, wire: Wire) -> None:
    wire.headers.append(b"X-Long: " + b"a" * draw.integer(8200, 70_000))


def _many_headers(draw: Draw, wire: Wire) -> None:
    wire.headers += [b"X-%d: y" % i for i in range(draw.integer(100, 5000))]


def _bad_length(draw: Draw, wire: Wire) -> None:
    wire.framing = [b"Content-Length: " + draw.choice((b"-1", b"abc", b"1e3", b"9" * 25, b"0x10", b""))]
    if chance(draw, 30):
        wire.framing = [b"Content-Length: 5", b"Content-Length: %d" % len(wire.body)]


def _chunked(draw: Draw, wire: Wire) -> None:
    wire.framing = [b"Transfer-Encoding: " + draw.choice((b"chunked", b"chunked, gzip", b"gzip, chunked", b"chnked"))]
    if chance(draw, 50):
        wire.framing.append(b"Content-Length: %d" % len(wire.body))
    body = wire.body
    wire.body = draw.choice((b"zz\r\n" + body, b"%x\r\n" % len(body) + body, b"f" * 18 + b"\r\nab", body))


def _short_body(draw: Draw, wire: Wire) -> None:
    wire.framing = [b"Content-Length: %d" % (len(wire.body) + draw.integer(1, 10_000))]


def _bare_lf(draw: Draw, wire: Wire) -> None:
    wire.end = b"\n"


SPOILERS: dict[str, Callable[[Draw, Wire], None]] = {
    "request_line": _request_line,
    "version": _version,
    "header_name": _header(b"Bad Header: x", b"X:Y: z", b"\xff: x", b"(x): y", b": empty", b"X\x00: y"),
    "control": _header(*(b"X-DRAIN-Voucher: x" + c for c in (b"\x00", b"\x01", b"\x7f", b"\x1b[0m", b"a\rb"))),
    "no_colon": _header(b"JustAName"),
    "folded": _header(b"X-Folded: a\r\n continued"),
    # Expect: only 100-continue is defined; aiohttp answers any other with a 417 of its own
    "expect": _header(b"Expect: 100-continue", b"Expect: 200-ok", b"Expect: \xff\xfe", b"Expect: \xe9t\xe9"),
    "long_line": _long_line,
    "many_headers": _many_headers,
    "bad_length": _bad_length,
    "chunked": _chunked,
    "short_body": _short_body,
    "bare_lf": _bare_lf,
}


def malformed_http(draw: Draw, target: Target) -> Probe:
    """Bytes that are not quite HTTP/1.1 (or not at all), sent raw, the write side then closed."""
    path = draw.choice((*PAID_PATHS, *FREE_PATHS, "/v1/admin/stats")).encode()
    body = b'{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
    wire = Wire(
        b"POST " + path + b" HTTP/1.1",
        [b"Host: 127.0.0.1", b"Content-Type: application/json", b"Connection: close"],
        [b"Content-Length: %d" % len(body)],
        body,
    )
    kind = draw.choice((*SPOILERS, "binary"))
    if kind == "binary":
        return Probe("http", b"?", path, voucher=kind, wire_bytes=draw.raw(2000))
    SPOILERS[kind](draw, wire)
    return Probe("http", wire.line.split(b" ")[0][:20], path, voucher=kind, wire_bytes=wire.join())


FAMILIES: dict[str, Callable[[Draw, Target], Probe]] = {
    "paid": paid,
    "free": free,
    "admin": admin,
    "http": malformed_http,  # sent with the write side closed after a short body, or a random one
}
