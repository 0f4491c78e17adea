"""The upstream model provider: any OpenAI-compatible base URL, called with the provider's key.

`Upstream` owns nothing but a reference to the app's aiohttp ClientSession (created and closed
by the app's cleanup context). Its errors are `UpstreamError`s whose messages are safe to return
to a client: they never contain the API key, and an upstream's own message is passed on only
for request errors the client can fix (400, 404, 422). No answer is read past
`max_answer_bytes` (MAX_ANSWER_BYTES): an upstream cannot make us hold an answer of any size.

Each call's outcome is kept in `health` for /health: when the upstream last answered, when it
last failed and how (the kind of failure and the status only: no URL, no key, no body).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from . import safejson
from .requestinfo import current, now

log = logging.getLogger(__name__)

_FORWARDED_UPSTREAM_STATUSES = {400, 404, 413, 422}
_CLIENT_STATUSES = {400, 413, 422}  # the request's fault, not the upstream's: not a failure of it
MODELS_TIMEOUT = 5.0  # GET /models, at start and by `doctor`: an upstream that takes longer is down
_KEY_PATTERN = re.compile(r"(sk|pk|key)[-_][A-Za-z0-9_\-*]{6,}")


class UpstreamError(Exception):
    """The upstream failed; `status` is what we answer (502, or 504 for a timeout)."""

    def __init__(self, message: str, *, status: int = 502, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.upstream_status = upstream_status


@dataclass
class UpstreamHealth:
    """The last outcome of the calls to the upstream."""

    last_ok_at: float | None = None
    last_error_at: float | None = None
    last_error: str | None = None  # "status 503", "timeout", "ClientConnectorError", ...

    def ok(self) -> None:
        self.last_ok_at = time.time()

    def failed(self, what: str) -> None:
        self.last_error_at, self.last_error = time.time(), what

    @property
    def failing(self) -> bool:
        """The last call failed."""
        return self.last_error_at is not None and (self.last_ok_at is None or self.last_error_at > self.last_ok_at)


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    body: bytes
    data: dict[str, Any]


class Upstream:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float,
        max_tokens_field: str = "max_tokens",
        max_answer_bytes: int = 8 * 1024 * 1024,
        name: str = "default",
    ) -> None:
        self.session = session
        self.name = name  # the catalog's name for it: what /health and the logs say, never its URL
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        # A stream may run for many minutes: what must not be long is the silence between bytes.
        self.stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout)
        self.max_tokens_field = max_tokens_field
        self.max_answer_bytes = max_answer_bytes  # the relay bounds a stream with it too
        self.health = UpstreamHealth()

    def serves(self, base_url: str, api_key: str | None, max_tokens_field: str) -> bool:
        """Whether this client already calls `base_url` with `api_key` as asked (a reload keeps it,
        and its health)."""
        return (self.base_url, self._api_key, self.max_tokens_field) == (
            base_url.rstrip("/"),
            api_key,
            max_tokens_field,
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return _KEY_PATTERN.sub("[redacted]", text)[:500]

    async def _post(self, path: str, body: dict[str, Any], *, stream: bool) -> aiohttp.ClientResponse:
        headers = self._headers()
        if stream:
            headers["Accept"] = "text/event-stream"
        timeout = self.stream_timeout if stream else self.timeout
        started = now()
        try:
            response = await self.session.post(
                self.base_url + path, data=safejson.dumps(body), headers=headers, timeout=timeout
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc, path) from None
        info = current()
        if info is not None:  # the access log's and the metrics' upstream latency
            info.upstream_head = now() - started
        return response

    async def post_json(self, path: str, body: dict[str, Any]) -> UpstreamResponse:
        """POST a JSON body and return the parsed JSON answer, or raise UpstreamError."""
        resp = await self._post(path, body, stream=False)
        try:
            raw = await read_capped(resp, self.max_answer_bytes)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc, path) from None
        finally:
            resp.release()  # it closes the connection if the body was not read to its end
        if resp.status != 200:
            raise self._status_error(resp.status, raw or b"")
        if raw is None:
            log.warning("upstream_answer_too_large path=%s limit=%d", path, self.max_answer_bytes)
            raise UpstreamError(f"The upstream's answer exceeded {self.max_answer_bytes} bytes; you were not charged.")
        try:
            data = safejson.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.warning("upstream_bad_json path=%s bytes=%d", path, len(raw))
            self.health.failed("invalid answer")
            raise UpstreamError("The upstream model provider sent an invalid answer; you were not charged.")
        self.health.ok()
        return UpstreamResponse(resp.status, raw, data)

    async def open_stream(self, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST a streaming request; the response once the upstream has answered 200 with an
        event stream (the caller reads and closes it), or an UpstreamError."""
        resp = await self._post(path, body, stream=True)
        if resp.status != 200 or resp.content_type != "text/event-stream":
            try:
                raw = await read_capped(resp, self.max_answer_bytes) or b""
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                resp.release()
            if resp.status == 200:
                log.warning("upstream_not_streaming content_type=%s", resp.content_type)
                self.health.failed("not streaming")
                raise UpstreamError("The upstream model provider did not stream; you were not charged.")
            raise self._status_error(resp.status, raw)
        self.health.ok()
        return resp

    async def models(self) -> list[str]:
        """The ids of GET {base}/models, within MODELS_TIMEOUT: whether the upstream answers,
        takes our key, and serves what we price. Raises UpstreamError (`upstream_status` set
        when it answered with an error)."""
        timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT)
        try:
            async with self.session.get(self.base_url + "/models", headers=self._headers(), timeout=timeout) as resp:
                raw = await read_capped(resp, self.max_answer_bytes)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._transport_error(exc, "/models") from None
        if resp.status != 200:
            raise self._status_error(resp.status, raw or b"")
        try:
            data = safejson.loads(raw or b"")
        except ValueError:
            data = None
        listed = data.get("data") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            self.health.failed("invalid answer")
            raise UpstreamError("The upstream's /models answer is not an OpenAI model list.")
        self.health.ok()
        return [str(m["id"]) for m in listed if isinstance(m, dict) and "id" in m]

    def _transport_error(self, exc: BaseException, path: str) -> UpstreamError:
        self.health.failed("timeout" if isinstance(exc, TimeoutError) else type(exc).__name__)
        return _transport_error(exc, path)

    def _status_error(self, status: int, raw: bytes) -> UpstreamError:
        log.warning("upstream_status upstream=%s status=%d bytes=%d", self.name, status, len(raw))
        if status not in _CLIENT_STATUSES:
            self.health.failed(f"status {status}")
        message = f"The upstream model provider answered {status}; you were not charged."
        if status in _FORWARDED_UPSTREAM_STATUSES:
            detail = _error_message(raw)
            if detail:
                message += " Upstream said: " + self._scrub(detail)
        return UpstreamError(message, upstream_status=status)


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body of `resp`, or None as soon as it is known to pass `limit` bytes: at once from its
    Content-Length, or when the bytes read so far pass it. What is beyond is never read, so the
    memory an answer takes is bounded by `limit`, not by what the upstream sends."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _transport_error(exc: BaseException, path: str) -> UpstreamError:
    if isinstance(exc, TimeoutError):
        log.warning("upstream_timeout path=%s", path)
        return UpstreamError("The upstream model provider timed out; you were not charged.", status=504)
    log.warning("upstream_unreachable path=%s error=%s", path, type(exc).__name__)
    return UpstreamError("The upstream model provider could not be reached; you were not charged.")


def _error_message(raw: bytes) -> str | None:
    try:
        data = safejson.loads(raw)
    except ValueError:
        return None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return None
