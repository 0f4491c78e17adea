"""The SSE parser: the same events however the bytes are cut, whatever the line endings."""

from __future__ import annotations

import random

import pytest

from drain_provider import sse

STREAM = (
    b": keep-alive\n\n"
    b'data: {"a": 1}\n\n'
    b"event: error\n"
    b'data: {"error": {"message": "x"}}\n\n'
    b"data: line one\n"
    b"data: line two\n\n"
    b"id: 7\nretry: 100\ndata: caf\xc3\xa9\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    (None, None, ["keep-alive"]),
    (b'{"a": 1}', None, []),
    (b'{"error": {"message": "x"}}', "error", []),
    (b"line one\nline two", None, []),
    (b"caf\xc3\xa9", None, []),
    (b"[DONE]", None, []),
]


def parse_in_pieces(data: bytes, cuts: list[int]) -> list[sse.Event]:
    parser = sse.Parser()
    events: list[sse.Event] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        events += parser.feed(data[start:cut])
        start = cut
    return events + parser.close()


def summary(events: list[sse.Event]) -> list[tuple[bytes | None, str | None, list[str]]]:
    return [(e.data, e.event, e.comments) for e in events]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_every_cut_and_line_ending_gives_the_same_events(ending: bytes) -> None:
    data = STREAM.replace(b"\n", ending)
    for cut in range(len(data) + 1):
        assert summary(parse_in_pieces(data, [cut])) == EXPECTED, (ending, cut)
    rng = random.Random(7)
    for _ in range(200):
        cuts = rng.sample(range(len(data)), rng.randint(2, 30))
        assert summary(parse_in_pieces(data, cuts)) == EXPECTED


def test_byte_by_byte() -> None:
    assert summary(parse_in_pieces(STREAM, list(range(len(STREAM))))) == EXPECTED


def test_raw_is_the_normalised_event_ready_to_forward() -> None:
    events = sse.Parser().feed(b'data: {"a": 1}\r\n\r\n: ping\r\n\r\n')
    assert [e.raw for e in events] == [b'data: {"a": 1}\n\n', b": ping\n\n"]


def test_a_last_event_without_its_blank_line_is_kept_by_close() -> None:
    parser = sse.Parser()
    assert parser.feed(b"data: [DONE]") == []
    assert [e.data for e in parser.close()] == [b"[DONE]"]
    assert parser.close() == []


def test_extra_blank_lines_are_not_events() -> None:
    events = sse.Parser().feed(b"\n\n\n\ndata: x\n\n\n\n")
    assert summary(events) == [(b"x", None, [])]


def test_encode_round_trips() -> None:
    data = sse.encode(data="a\nb", event="error", comments=["X-DRAIN-Cost: 5"])
    assert data == b": X-DRAIN-Cost: 5\nevent: error\ndata: a\ndata: b\n\n"
    (event,) = sse.Parser().feed(data)
    assert (event.data, event.event, event.comments) == (b"a\nb", "error", ["X-DRAIN-Cost: 5"])


def test_an_event_larger_than_the_bound_is_refused_as_it_grows() -> None:
    parser = sse.Parser(max_event_bytes=100)
    assert [e.data for e in parser.feed(b"data: " + b"x" * 90 + b"\n\n")] == [b"x" * 90]
    assert parser.feed(b"data: " + b"y" * 60) == []
    with pytest.raises(sse.EventTooLarge):
        parser.feed(b"y" * 60)  # the unfinished event would pass 100 bytes: it is not held


def test_a_complete_event_larger_than_the_bound_is_refused() -> None:
    with pytest.raises(sse.EventTooLarge):
        sse.Parser(max_event_bytes=100).feed(b"data: ok\n\ndata: " + b"z" * 200 + b"\n\ndata: ok\n\n")


def test_many_small_events_in_one_read_are_within_the_bound() -> None:
    events = sse.Parser(max_event_bytes=100).feed(b"data: 0123456789\n\n" * 1000)
    assert len(events) == 1000
