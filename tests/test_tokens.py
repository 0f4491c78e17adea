"""Pins `drain_provider.tokens`: input token counts that size every reservation.

- `count_messages` follows OpenAI's recipe: 3 tokens per message, the tokens of each string
  value, 1 more for a `name`, 3 to prime the reply; text parts are counted, image parts cost a
  fixed `IMAGE_TOKENS`.
- `count_text` counts "<|endoftext|>" as ordinary text instead of raising; `count_prompt`
  handles every legacy prompt shape.
- With no network and an empty tiktoken cache, counting still works (cl100k from the bundled
  offline copy) and the fallback is logged exactly once per wanted encoding and process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiktoken

from drain_provider.tokens import (
    IMAGE_TOKENS,
    OFFLINE_ENCODING,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    TokenCounter,
)

# gpt-4 maps to cl100k_base: the same tokens whether tiktoken loads it or falls back offline.
MODEL = "gpt-4"
CL100K = tiktoken.get_encoding(OFFLINE_ENCODING)


def n(text: str) -> int:
    return len(CL100K.encode(text, disallowed_special=()))


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def test_recipe_constants() -> None:
    assert (TOKENS_PER_MESSAGE, TOKENS_PER_NAME, REPLY_PRIMING_TOKENS) == (3, 1, 3)


def test_count_text(counter: TokenCounter) -> None:
    assert counter.count_text(MODEL, "hello world") == n("hello world") == 2
    assert counter.count_text(MODEL, "") == 0


def test_count_text_with_special_token_text(counter: TokenCounter) -> None:
    text = "before <|endoftext|> after"
    assert counter.count_text(MODEL, text) == n(text)
    assert counter.count_text(MODEL, "<|endoftext|>") > 1  # ordinary text, not the one special token


def test_count_messages_recipe(counter: TokenCounter) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "name": "alice", "content": "What is a payment channel?"},
    ]
    expected = (
        REPLY_PRIMING_TOKENS
        + (3 + n("system") + n("You are a helpful assistant."))
        + (3 + n("user") + 1 + n("alice") + n("What is a payment channel?"))
    )
    assert counter.count_messages(MODEL, messages) == expected


def test_count_messages_empty(counter: TokenCounter) -> None:
    assert counter.count_messages(MODEL, []) == 3


def test_count_messages_content_parts(counter: TokenCounter) -> None:
    parts = [
        {"type": "text", "text": "Describe this picture"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "in one line"},
    ]
    expected = 3 + 3 + n("user") + n("Describe this picture") + IMAGE_TOKENS + n("in one line")
    assert counter.count_messages(MODEL, [{"role": "user", "content": parts}]) == expected


def test_count_messages_two_images(counter: TokenCounter) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert counter.count_messages(MODEL, [{"role": "user", "content": [image, image]}]) == 6 + n("user") + 2 * 765


def test_count_messages_null_content_and_tool_calls(counter: TokenCounter) -> None:
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    # a list value is read as parts: each tool call is counted as its compact JSON
    expected = 6 + n("assistant") + n(json.dumps(calls[0], separators=(",", ":")))
    assert counter.count_messages(MODEL, [message]) == expected


def test_count_messages_with_tools(counter: TokenCounter) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    without = counter.count_messages(MODEL, messages)
    assert counter.count_messages(MODEL, messages, tools) == without + n(json.dumps(tools, separators=(",", ":")))


def test_count_messages_non_dict_message_costs_the_wrapper(counter: TokenCounter) -> None:
    assert counter.count_messages(MODEL, ["not a message"]) == 6


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello world", 2),
        (["hello world", "say this is a test"], 2 + n("say this is a test")),
        ([15339, 1917, 0], 3),
        ([[15339, 1917], [1, 2, 3]], 5),
        ([], 0),
        (None, 0),
    ],
    ids=["string", "strings", "token array", "token arrays", "empty", "none"],
)
def test_count_prompt(counter: TokenCounter, prompt: object, expected: int) -> None:
    assert counter.count_prompt(MODEL, prompt) == expected


def test_unknown_model_uses_default_encoding(counter: TokenCounter) -> None:
    assert counter.encoding_name("demo") == "cl100k_base"
    assert counter.count_text("demo", "hello world") == 2


# --- offline -----------------------------------------------------------------------------------

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    from concurrent.futures import ThreadPoolExecutor
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    from drain_provider.tokens import TokenCounter

    counter = TokenCounter()
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda _: counter.count_text("gpt-4o", "hello world"), range(8)))
    counts = {
        "gpt-4o": first + [counter.count_text("gpt-4o", "hello world") for _ in range(3)],
        "gpt-4": [counter.count_text("gpt-4", "hello world") for _ in range(3)],
        "gpt-4o-mini": [counter.count_text("gpt-4o-mini", "hello world")],
        # A new counter (every app, every test makes one) must not try the download again.
        "again": [TokenCounter().count_text("gpt-4o", "hello world")],
    }
    print(json.dumps(counts))
    """
)


def test_offline_fallback_counts_and_logs_once(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    closed = "http://127.0.0.1:9"
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SYSTEMROOT") if k in os.environ}
    env.update(TIKTOKEN_CACHE_DIR=str(cache), HTTPS_PROXY=closed, HTTP_PROXY=closed, https_proxy=closed)
    env.update(http_proxy=closed)
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    expected = len(CL100K.encode("hello world"))
    counts = json.loads(result.stdout)
    assert all(count == expected for values in counts.values() for count in values), counts
    fallbacks = [line for line in result.stderr.splitlines() if "tokenizer_fallback" in line]
    wanted = sorted(line.split("wanted=")[1].split()[0] for line in fallbacks)
    assert wanted == ["cl100k_base", "o200k_base"], result.stderr  # gpt-4o and gpt-4o-mini share o200k
    assert all(f"using={OFFLINE_ENCODING}" in line for line in fallbacks)
