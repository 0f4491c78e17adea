"""JSON parsing for untrusted bytes, bounded in nesting depth.

Python's C JSON decoder recurses once per nesting level and relies on the interpreter's
recursion limit to stop. py-evm (imported with web3) raises that limit to 100,000, far past
what the C stack holds, so a request body of 100,000 `[` kills the process with a segfault
instead of raising RecursionError. Every body we did not write ourselves is parsed here.
"""

from __future__ import annotations

import json
import re
from typing import Any

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
    """json.loads, refusing documents nested deeper than MAX_DEPTH (raises ValueError)."""
    data = raw.encode() if isinstance(raw, str) else raw
    # Counting brackets is C-speed; only documents with many of them need the exact scan.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and nesting_depth(data) > MAX_DEPTH:
        raise TooDeep(f"JSON nested deeper than {MAX_DEPTH} levels")
    return json.loads(data)
