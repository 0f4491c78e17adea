"""Server-sent events: an incremental parser and the encoder for what we send.

The parser takes bytes as they come off the socket (an event may be split across reads, several
may arrive in one, lines may end in \\r\\n, \\n or \\r) and returns complete events. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Event:
    data: str | None = None  # the data lines joined with "\n"; None if the event had none
    event: str | None = None
    comments: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode(data=self.data, event=self.event, comments=self.comments)


def encode(*, data: str | None = None, event: str | None = None, comments: list[str] | None = None) -> bytes:
    lines = [f": {comment}" if comment else ":" for comment in comments or ()]
    if event is not None:
        lines.append(f"event: {event}")
    if data is not None:
        lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def _parse_block(block: bytes) -> Event:
    event = Event()
    data_lines: list[str] = []
    for raw_line in block.split(b"\n"):
        line = raw_line.decode("utf-8", "replace")
        if line.startswith(":"):
            event.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data_lines.append(value)
        elif name == "event":
            event.event = value
        # "id" and "retry" mean nothing to a completion stream
    if data_lines:
        event.data = "\n".join(data_lines)
    return event


class Parser:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by `chunk`."""
        buffer = self._buffer + chunk
        # A trailing \r may be the first half of a \r\n split across reads: keep it for later.
        held = b"\r" if buffer.endswith(b"\r") else b""
        if held:
            buffer = buffer[:-1]
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, rest = buffer.split(b"\n\n")
        self._buffer = rest + held
        return [_parse_block(block) for block in blocks if block.strip(b"\n")]

    def close(self) -> list[Event]:
        """The last event, if the stream ended without its blank line."""
        rest, self._buffer = self._buffer.replace(b"\r", b"\n"), b""
        return [_parse_block(rest)] if rest.strip(b"\n") else []
