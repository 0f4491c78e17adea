"""JSON from outside: bounded depth, UTF-8, no NaN, and every failure a ValueError."""

from __future__ import annotations

import pytest

from drain_provider import safejson


def test_parses_bytes_and_str_alike() -> None:
    assert safejson.loads(b'{"a": [1, 2.5, "\\u00e9", null, true]}') == {"a": [1, 2.5, "é", None, True]}
    assert safejson.loads('{"a": "é"}') == {"a": "é"}


def test_a_utf8_bom_is_skipped() -> None:
    assert safejson.loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1e400}', b'{"a": "\xff"}', b"", b'{"a": 1} x'],
    ids=["truncated", "nan", "infinity", "overflow", "bad utf-8", "empty", "trailing"],
)
def test_bad_documents_are_value_errors(raw: bytes) -> None:
    with pytest.raises(ValueError):
        safejson.loads(raw)


def test_depth_is_bounded_with_its_own_error() -> None:
    ok = b"[" * safejson.MAX_DEPTH + b"]" * safejson.MAX_DEPTH
    assert safejson.loads(ok) is not None
    with pytest.raises(safejson.TooDeep):
        safejson.loads(b"[" * (safejson.MAX_DEPTH + 1) + b"]" * (safejson.MAX_DEPTH + 1))
    with pytest.raises(safejson.TooDeep):
        safejson.loads(b"[" * 100_000)
    # Brackets inside strings are text, not nesting.
    assert safejson.loads(b'["' + b"[" * 1000 + b'"]') == ["[" * 1000]


def test_integers_past_64_bits_come_back_as_floats_not_as_wrong_integers() -> None:
    value = safejson.loads(b'{"n": 123456789012345678901234567890}')["n"]
    assert isinstance(value, float)
    assert safejson.loads(b'{"n": 18446744073709551615}')["n"] == 2**64 - 1


def test_dumps_round_trips() -> None:
    doc = {"model": "demo", "temperature": 0.7, "messages": [{"role": "user", "content": "é 🙂"}], "n": 2}
    assert safejson.loads(safejson.dumps(doc)) == doc
