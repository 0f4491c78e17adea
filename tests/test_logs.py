"""Log hygiene: URLs' secrets redacted from every line, and aiohttp's parse errors turned into
one quiet line while its real errors stay errors."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadStatusLine, LineTooLong
from aiohttp.web import RequestPayloadError
from helpers import fresh_bad_request_budget

from drain_provider.logs import (
    SERVER_LOGGER,
    BadRequestFilter,
    RateLimit,
    RedactingFilter,
    quiet_bad_requests,
    redact,
    short_error,
)

ALCHEMY_KEY = "Zx8kQ2mP9vLr4TnY7wBc1DfGhJ3sKaE5"
INFURA_KEY = "9aa3d95b3bc440fa88ea12eaa4456161"
QUICKNODE_TOKEN = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            f"Successfully disconnected from: https://polygon-mainnet.g.alchemy.com/v2/{ALCHEMY_KEY}",
            "Successfully disconnected from: https://polygon-mainnet.g.alchemy.com/v2/***",
        ),
        (f"rpc=https://mainnet.infura.io/v3/{INFURA_KEY} ok", "rpc=https://mainnet.infura.io/v3/*** ok"),
        (f"https://dry-wild-sun.matic.quiknode.pro/{QUICKNODE_TOKEN}/", "https://dry-wild-sun.matic.quiknode.pro/***/"),
        ("https://user:hunter2@rpc.example.com:8545/", "https://***@rpc.example.com:8545/"),
        ("https://token@rpc.example.com/", "https://***@rpc.example.com/"),
        ("url=postgresql://drain:pg-pass@db.internal:5432/drain", "url=postgresql://***@db.internal:5432/drain"),
        ("postgres://drain:p%40ss@[::1]/drain?sslmode=require", "postgres://***@[::1]/drain?***"),
        ("https://rpc.example.com/polygon?apikey=abc&x=1 next", "https://rpc.example.com/polygon?*** next"),
        ("https://rpc.example.com?apikey=abc", "https://rpc.example.com?***"),
        ("'http://[::1]:8545/?key=abc'", "'http://[::1]:8545/?***'"),
        # What must stay readable: no credential in it.
        ("upstream=https://api.openai.com/v1 host=0.0.0.0", "upstream=https://api.openai.com/v1 host=0.0.0.0"),
        ("listening url=http://127.0.0.1:3000", "listening url=http://127.0.0.1:3000"),
        ("https://example.com/v1/chat/completions#part", "https://example.com/v1/chat/completions#part"),
        ("paid channel=0xabc cost=12", "paid channel=0xabc cost=12"),
    ],
)
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected
    assert redact(expected) == expected  # idempotent: two redacting handlers do no harm


def test_every_part_of_a_record_is_redacted_before_it_is_formatted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    url = f"https://user:pw@eth.example.com/v2/{ALCHEMY_KEY}?apikey=QUERYSECRET"
    try:
        try:
            raise RuntimeError(f"cannot reach {url}")
        except RuntimeError:
            logger.exception("rpc_failed url=%s", url, stack_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "rpc_failed url=https://***@eth.example.com/v2/***?***" in text
    assert "RuntimeError: cannot reach https://***@" in text  # the traceback too
    for secret in ("pw@", ALCHEMY_KEY, "QUERYSECRET"):
        assert secret not in text


def test_rate_limit_counts_what_it_left_out() -> None:
    limit = RateLimit(2, 10.0)
    assert [limit.allow(now=t) for t in (0.0, 1.0, 2.0, 3.0)] == [(True, 0), (True, 0), (False, 0), (False, 0)]
    assert limit.allow(now=10.5) == (True, 2)  # the next window says how many the last one refused
    assert limit.allow(now=11.0) == (True, 0)


def test_a_short_error_shows_little_of_what_the_client_sent() -> None:
    sent = "\x16\x03\x01" + "A" * 5000
    text = short_error(BadStatusLine(sent))
    assert text.startswith("BadStatusLine: ") and "\x16" not in text and "\n" not in text
    assert len(text) < 150
    assert short_error(LineTooLong("x" * 9000, 8190)).startswith("LineTooLong: ")


def test_aiohttp_parse_errors_are_one_line_and_its_other_errors_stay_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet_bad_requests()
    fresh_bad_request_budget()  # once per process, however often asked
    server_log = logging.getLogger(SERVER_LOGGER)
    assert sum(isinstance(f, BadRequestFilter) for f in server_log.filters) == 1
    with caplog.at_level(logging.DEBUG):
        server_log.exception("Error handling request from %s", "10.0.0.1", exc_info=BadStatusLine("GARBAGE" * 50))
        server_log.exception("Unhandled exception", exc_info=RuntimeError("a bug of ours"))
        # A body that cannot be decoded (gzip that is not), met while aiohttp drains it.
        server_log.exception("Unhandled exception", exc_info=RequestPayloadError("400, message:\n  Can not decode"))
    quiet, bug, body = caplog.records
    assert quiet.name == "drain_provider.logs" and quiet.levelno == logging.INFO and quiet.exc_info is None
    assert quiet.getMessage().startswith("bad_http_request peer=10.0.0.1 error=BadStatusLine: ")
    assert bug.name == SERVER_LOGGER and bug.levelno == logging.ERROR and bug.exc_info is not None
    assert body.getMessage() == "bad_http_request peer=- error=RequestPayloadError: 400, message: Can not decode"


def test_json_lines_are_redacted_and_carry_the_fields(tmp_path: Path) -> None:
    """LOG_FORMAT=json through setup_logging, as the server sets it up: every logger (ours and a
    library's) writes one JSON object per line, redacted like a text line."""
    script = f"""
import logging
from pathlib import Path
from drain_provider.logs import setup_logging
setup_logging("INFO", log_format="json")
url = "https://user:pw@eth.example.com/v2/{ALCHEMY_KEY}?apikey=QUERYSECRET"
chain = logging.getLogger("drain_provider.chain")
chain.warning("chain_rpc_failed url=%s error=%s blocks=%d", url, "Timeout error", 12)
logging.getLogger("web3.providers").info("Closing session %s", url)
try:
    raise RuntimeError("cannot reach " + url)
except RuntimeError:
    logging.getLogger("drain_provider.x").exception("crashed level=%s", "level")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in lines] == [
        "chain_rpc_failed",
        "Closing session https://***@eth.example.com/v2/***?***",
        "crashed",
    ]
    first = lines[0]
    assert (first["level"], first["logger"], first["error"], first["blocks"]) == (
        "WARNING",
        "drain_provider.chain",
        "Timeout error",
        12,
    )
    assert first["url"] == "https://***@eth.example.com/v2/***?***"
    assert first["ts"].endswith("+00:00")
    assert lines[2]["field_level"] == "level"  # a field never overwrites ts, level, logger or event
    assert "RuntimeError: cannot reach https://***@" in lines[2]["exc"]
    for secret in ("pw@", ALCHEMY_KEY, "QUERYSECRET"):
        assert secret not in done.stderr
