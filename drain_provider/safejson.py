"""JSON for bytes from outside (request bodies, upstream answers, stream events): bounded in
nesting depth, and fast.

The depth bound is ours to choose and report (MAX_DEPTH, with its own error) rather than a
parser's: the standard library's C decoder recurses once per level and relies on the
interpreter's recursion limit, which py-evm (imported with web3) raises to 100,000, far past
what the C stack holds; a body of 100,000 `[` once killed the process with a segfault.
"""

from __future__ import annotations

import codecs
import re
from typing import Any

import orjson

MAX_DEPTH = 128

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


class TooDeep(ValueError):
    pass


def nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting outside JSON strings."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads(raw: bytes | str) -> Any:
    """Parse JSON from outside, refusing documents nested deeper than MAX_DEPTH. Every failure
    is a ValueError.

    orjson parses: a relay decodes every token event of a stream, and orjson does it about three
    times faster than the standard library. It is also stricter: UTF-8 only (a BOM is
    skipped), no NaN or Infinity. Integers beyond 64 bits come back as floats, which every
    integer field we read refuses as it would any float.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    # Counting brackets is C-speed; only documents with many of them need the exact scan.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and nesting_depth(data) > MAX_DEPTH:
        raise TooDeep(f"JSON nested deeper than {MAX_DEPTH} levels")
    return orjson.loads(data[3:] if data.startswith(codecs.BOM_UTF8) else data)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (orjson: floats and integers as they were parsed by `loads`)."""
    return orjson.dumps(obj)
