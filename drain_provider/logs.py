"""Logging for the serving process: the format, secrets kept out of every line, and one quiet
line for each malformed HTTP request instead of a traceback.

Every handler gets `RedactingFilter`: an RPC or upstream URL often carries an API key in its
query string, its user-info or a path segment (Alchemy's `/v2/<key>`, Infura's `/v3/<key>`,
QuickNode's token), and libraries log URLs we do not control (web3 logs the provider's URL when
its session closes). `redact` is applied to the whole formatted line, traceback included.

aiohttp logs every request it cannot parse at ERROR with a traceback and the client's bytes:
on an open port that is anyone's to fill. `BadRequestFilter` turns those records into one short
line at INFO, at most `BAD_REQUEST_LINES` per `BAD_REQUEST_WINDOW` seconds, and leaves every
other aiohttp error (a real bug) as it was.

LOG_FORMAT=json writes each record as one JSON object (`JsonFormatter`): `ts`, `level`,
`logger`, `event` (the first word of an `event key=value ...` line, or a library's whole
message) and each key=value as a key of its own; a traceback is one `exc` string. The redacting
filter runs before any formatter, so a JSON line is redacted exactly as a text line is.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"

# --- redaction --------------------------------------------------------------------------------

HIDDEN = "***"
# A URL as it appears in a log line: scheme, then anything up to whitespace, a quote or a bracket.
_URL = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"<>(){}`]+)")
# A path segment that is a credential: long, from a token's alphabet, with a digit (a word or
# a version like "v1" is not one). API keys of the RPC providers are 32 characters and up.
_TOKEN_SEGMENT = re.compile(r"(?=[A-Za-z_-]*[0-9])[A-Za-z0-9_-]{20,}")
# Providers whose key follows a short version segment: Alchemy /v2/<key>, Infura /v3/<key>.
_VERSIONED_KEY = re.compile(r"(?i)^v[0-9]+$")


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match["scheme"], match["rest"]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = HIDDEN + "@" + authority.rpartition("@")[2]
    if not slash:  # "https://host?key=..." has no path, its query sits in the authority
        authority, question, _ = authority.partition("?")
        return scheme + authority + (question and "?" + HIDDEN)
    path, question, _ = path.partition("?")
    path, hash_, fragment = path.partition("#")
    segments = path.split("/")
    for i, segment in enumerate(segments):
        after_version = i > 0 and _VERSIONED_KEY.match(segments[i - 1]) is not None and len(segment) >= 16
        if after_version or _TOKEN_SEGMENT.fullmatch(segment):
            segments[i] = HIDDEN
    tail = ("?" + HIDDEN) if question else (hash_ + fragment)
    return scheme + authority + slash + "/".join(segments) + tail


def redact(text: str) -> str:
    """`text` with every URL's credentials, query string and key-like path segments replaced by
    `***`: what a log line may say about an endpoint without handing out its API key."""
    if "://" not in text:
        return text
    return _URL.sub(_redact_url, text)


class RedactingFilter(logging.Filter):
    """On a handler: the record's message, arguments, traceback and stack rendered and redacted,
    before any formatter sees them."""

    _render = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: the handler reports that as it always does
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = self._render.formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# --- malformed requests -----------------------------------------------------------------------

BAD_REQUEST_LINES = 10
BAD_REQUEST_WINDOW = 10.0
_SHOWN_CHARS = 100


class RateLimit:
    """At most `limit` events per `window` seconds; `allow` also says how many were refused in
    the windows since the last one allowed, so the log can say what it left out."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._start = -window
        self._used = 0
        self._refused = 0

    def allow(self, now: float | None = None) -> tuple[bool, int]:
        now = time.monotonic() if now is None else now
        if now - self._start >= self.window:
            self._start, self._used = now, 0
        if self._used >= self.limit:
            self._refused += 1
            return False, 0
        self._used += 1
        refused, self._refused = self._refused, 0
        return True, refused


def short_error(exc: BaseException) -> str:
    """`Class: message`, printable, one line, at most about 100 characters of what the client sent."""
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    text = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS] + "..."
    return f"{type(exc).__name__}: {text}"


# What a client's malformed bytes raise: in the head, or in a body that cannot be decoded
# (a bad chunk, a gzip body that is not gzip), which aiohttp logs as "Unhandled exception".
CLIENT_ERRORS = (HttpProcessingError, RequestPayloadError)


class BadRequestFilter(logging.Filter):
    """On aiohttp's server logger: a request aiohttp could not parse becomes one rate-limited
    `bad_http_request` line of ours (DEBUG where aiohttp itself chose DEBUG: its guess that a TLS
    or non-HTTP client knocked); any other record passes unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.limit = RateLimit(BAD_REQUEST_LINES, BAD_REQUEST_WINDOW)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, CLIENT_ERRORS):
            return True
        allowed, suppressed = self.limit.allow()
        if allowed:
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "-"
            level = logging.DEBUG if record.levelno < logging.INFO else logging.INFO
            log.log(level, "bad_http_request peer=%s error=%s", peer, short_error(exc))
            if suppressed:
                log.info("bad_http_request suppressed=%d", suppressed)
        return False


SERVER_LOGGER = "aiohttp.server"


def quiet_bad_requests() -> None:
    """Install `BadRequestFilter` on aiohttp's server logger, once per process."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, BadRequestFilter) for f in logger.filters):
        logger.addFilter(BadRequestFilter())


# --- JSON lines -------------------------------------------------------------------------------

# Where a `key=value` field starts: a space, then a name and "=". A value runs to the next one,
# so a value with spaces (an error's text) stays whole.
_FIELD = re.compile(r" (?=[A-Za-z_][A-Za-z0-9_.]*=)")
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_RESERVED = frozenset({"ts", "level", "logger", "event", "exc", "stack"})


def fields(message: str) -> dict[str, Any]:
    """`event key=value ...` as {"event": ..., key: value}; whole numbers as numbers. A message
    not in that shape (a library's) is all `event`."""
    head, *rest = _FIELD.split(message)
    parsed: dict[str, Any] = {"event": head}
    for part in rest:
        key, _, value = part.partition("=")
        if key in _RESERVED:
            key = "field_" + key
        parsed[key] = int(value) if _INTEGER.fullmatch(value) else value
    return parsed


class JsonFormatter(logging.Formatter):
    """One JSON object per record (LOG_FORMAT=json), for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        line.update(fields(record.getMessage()))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str = FORMAT, *, log_format: str = "text") -> None:
    """Lines to stderr at `level` (`fmt` for text, or JSON objects), every handler redacting;
    malformed requests quiet."""
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
    # web3 logs full RPC requests at DEBUG; they may carry signed payloads but never keys.
    logging.getLogger("web3").setLevel(max(logging.INFO, logging.getLevelName(level)))
    quiet_bad_requests()
