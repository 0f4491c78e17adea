"""Server-sent events: an incremental parser and the encoder for what we send.

The parser takes bytes as they come off the socket (an event may be split across reads, several
may arrive in one, lines may end in \\r\\n, \\n or \\r) and returns complete events, each with
its bytes normalised to \\n line endings so that it can be forwarded as it came. It stays in
bytes: a relay parses every token event, and decoding to str and back costs per event. It holds
at most `max_event_bytes` of one event: a peer that never ends its event (or its line) cannot
make it buffer without end. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Event:
    raw: bytes  # the whole event, "\n" line endings, ending in a blank line: ready to forward
    data: bytes | None = None  # the data lines joined with "\n"; None if the event had none
    event: str | None = None
    comments: list[str] = field(default_factory=list)


def encode(*, data: str | None = None, event: str | None = None, comments: list[str] | None = None) -> bytes:
    lines = [f": {comment}" if comment else ":" for comment in comments or ()]
    if event is not None:
        lines.append(f"event: {event}")
    if data is not None:
        lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def _parse_block(block: bytes) -> Event:
    raw = block + b"\n\n"
    if block.startswith(b"data: ") and b"\n" not in block:  # the common case: one data line
        return Event(raw, data=block[6:])
    event = Event(raw)
    data_lines: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b":"):
            event.comments.append(line[1:].strip().decode("utf-8", "replace"))
            continue
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            data_lines.append(value)
        elif name == b"event":
            event.event = value.decode("utf-8", "replace")
        # "id" and "retry" mean nothing to a completion stream
    if data_lines:
        event.data = b"\n".join(data_lines)
    return event


class EventTooLarge(ValueError):
    """An event passed the parser's `max_event_bytes`."""


class Parser:
    def __init__(self, max_event_bytes: int | None = None) -> None:
        self.max_event_bytes = max_event_bytes  # None: no bound
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by `chunk`; EventTooLarge if one of them, or the one it leaves
        unfinished, passes `max_event_bytes`."""
        buffer = self._buffer + chunk if self._buffer else chunk
        # A trailing \r may be the first half of a \r\n split across reads: keep it for later.
        held = b"\r" if buffer.endswith(b"\r") else b""
        if held:
            buffer = buffer[:-1]
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, rest = buffer.split(b"\n\n")
        limit = self.max_event_bytes
        # Cheap in the common case: only a buffer past the bound can hold an event past it.
        if limit is not None and len(buffer) > limit and max(map(len, [rest, *blocks])) > limit:
            self._buffer = b""
            raise EventTooLarge(f"an event passed {limit} bytes")
        self._buffer = rest + held
        return [_parse_block(block.strip(b"\n")) for block in blocks if block.strip(b"\n")]

    def close(self) -> list[Event]:
        """The last event, if the stream ended without its blank line."""
        rest, self._buffer = self._buffer.replace(b"\r", b"\n").strip(b"\n"), b""
        return [_parse_block(rest)] if rest else []
