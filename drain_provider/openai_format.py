"""The OpenAI wire format: what a paid request asks for, what goes upstream, what comes back.

Pure functions and records over parsed JSON, no I/O: request parsing for chat and legacy
completions (validated completely before a voucher is looked at, so a bad body never reaches the
ledger; its input tokens are counted only after, as counting costs in proportion to the text),
the body sent upstream, the usage an upstream reports, the text a completion or a stream chunk
carries, a completion cut to a token budget, and the few chunks the provider writes itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import tiktoken

from .pricing import ModelPrice, ReservationPlan
from .states import UsageSource
from .tokens import TokenCounter, fit_prefix

CHAT = "/chat/completions"
LEGACY = "/completions"
EMBEDDINGS = "/embeddings"
IMAGES = "/images/generations"
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound on the inputs of one embeddings request
MAX_IMAGES = 10  # OpenAI's bound on n for image generation
MAX_OUTPUT_TOKENS = 10_000_000
MAX_CHOICES = 128
# OpenAI's legacy completions endpoint produces 16 tokens when max_tokens is not given.
LEGACY_DEFAULT_MAX_TOKENS = 16
MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")


class RequestError(ValueError):
    """The request body is not one this endpoint serves. `code` is `invalid_request` or
    `model_not_supported`; the message is safe to show to the client."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    source: UsageSource
    cost_usd: Decimal | None = None  # `usage.cost` (OpenRouter): the upstream's own price, in USD


@dataclass(frozen=True)
class CompletionRequest:
    """A validated chat or legacy completion request, and what its output may cost. Its input
    is counted on demand (`input_tokens`): that is the part that costs in proportion to the body."""

    endpoint: str  # CHAT or LEGACY, the path under the upstream's base URL
    body: dict[str, Any]
    model: str
    price: ModelPrice
    choices: int  # outputs generated per request (n, or best_of, times the prompts)
    per_choice_tokens: int  # output tokens asked for per choice (or the default)
    markup: Fraction | None = None  # pass-through billing (catalog.ModelRoute.markup)

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def client_wants_usage(self) -> bool:
        """Whether the client asked for the usage chunk of a stream (we always ask upstream)."""
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    def input_tokens(self, counter: TokenCounter) -> int:
        """The input's tokens, counted as OpenAI counts them (tiktoken: milliseconds per 100 kB;
        thread-safe, so it may run off the event loop)."""
        if self.chat:
            return counter.count_messages(self.model, self.body["messages"], tools=self._tools)
        return counter.count_prompt(self.model, self.body["prompt"])

    def least_input_tokens(self, counter: TokenCounter) -> int:
        """A bound `input_tokens` never goes below, without encoding anything."""
        if self.chat:
            return counter.least_messages(self.model, self.body["messages"], tools=self._tools)
        return counter.least_prompt(self.model, self.body["prompt"])

    @property
    def _tools(self) -> Any:
        return self.body.get("tools") or self.body.get("functions")

    def plan(self, input_tokens: int, min_output_tokens: int) -> ReservationPlan:
        """The worst case to reserve, and the least a voucher must leave room for."""
        return ReservationPlan(
            self.price,
            input_tokens,
            self.per_choice_tokens * self.choices,
            min(min_output_tokens, self.per_choice_tokens) * self.choices,
            markup=self.markup,
        )

    def upstream_body(self, output_tokens: int, default_field: str, model: str | None = None) -> dict[str, Any]:
        """The request as sent upstream: the client's body with its output limit lowered to the
        `output_tokens` the reservation pays for (shared by the choices), and `model` as the
        upstream names it. The client's own limit field is kept; if it gave none,
        `default_field`. A stream always asks for the usage chunk: it is what we bill on."""
        per_choice = output_tokens // self.choices
        body = dict(self.body)
        if model is not None:
            body["model"] = model
        fields = [field for field in MAX_TOKEN_FIELDS if self.body.get(field) is not None] or [default_field]
        for field in fields:
            body[field] = min(self.body.get(field) or per_choice, per_choice)
        if self.stream:
            body["stream_options"] = {**(self.body.get("stream_options") or {}), "include_usage": True}
        return body


# --- parsing requests -------------------------------------------------------------------------


def _positive_int(body: dict[str, Any], field: str, maximum: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise RequestError(f"'{field}' must be an integer from 1 to {maximum}.")
    return value


def _model_price(body: dict[str, Any], prices: Mapping[str, ModelPrice]) -> tuple[str, ModelPrice]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required and must be a string.")
    price = prices.get(model)
    if price is None:
        raise RequestError(f"Model '{model[:100]}' is not available here; see GET /v1/models.", "model_not_supported")
    return model, price


def requested_output_tokens(body: dict[str, Any]) -> int | None:
    """The client's own output limit per choice: the lower of the fields it set."""
    limits = [body[field] for field in MAX_TOKEN_FIELDS if body.get(field) is not None]
    return min(limits) if limits else None


def _common(body: dict[str, Any]) -> tuple[int, int | None]:
    """The fields both endpoints share: (n, the requested output limit)."""
    if body.get("stream") not in (None, False, True):
        raise RequestError("'stream' must be a boolean.")
    options = body.get("stream_options")
    if options is not None and (
        not isinstance(options, dict) or options.get("include_usage") not in (None, False, True)
    ):
        raise RequestError("'stream_options' must be an object; 'include_usage' a boolean.")
    for field in MAX_TOKEN_FIELDS:
        _positive_int(body, field, MAX_OUTPUT_TOKENS)
    n = _positive_int(body, "n", MAX_CHOICES) or 1
    return n, requested_output_tokens(body)


def parse_chat(body: dict[str, Any], prices: Mapping[str, ModelPrice], *, default_max_tokens: int) -> CompletionRequest:
    model, price = _model_price(body, prices)
    return chat_request(body, model, price, default_max_tokens=default_max_tokens)


def chat_request(
    body: dict[str, Any], model: str, price: ModelPrice, *, default_max_tokens: int, markup: Fraction | None = None
) -> CompletionRequest:
    """A chat request for a model already found (its name as asked, its price)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("'messages' must be a non-empty array of message objects.")
    n, wanted = _common(body)
    return CompletionRequest(CHAT, body, model, price, n, wanted or default_max_tokens, markup)


def parse_legacy(body: dict[str, Any], prices: Mapping[str, ModelPrice]) -> CompletionRequest:
    model, price = _model_price(body, prices)
    return legacy_request(body, model, price)


def legacy_request(
    body: dict[str, Any], model: str, price: ModelPrice, *, markup: Fraction | None = None
) -> CompletionRequest:
    """A legacy completions request for a model already found."""
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
        raise RequestError("'prompt' must be a string or a non-empty array.")
    n, wanted = _common(body)
    best_of = _positive_int(body, "best_of", MAX_CHOICES) or 1
    # A list of strings (or of token arrays) is that many prompts; a list of ints is one prompt.
    prompts = len(prompt) if isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt) else 1
    choices = max(n, best_of) * prompts
    return CompletionRequest(LEGACY, body, model, price, choices, wanted or LEGACY_DEFAULT_MAX_TOKENS, markup)


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A validated embeddings request: priced per input token, no output. `input` is a string,
    strings, a token array or token arrays, as OpenAI takes it (a token array counts its length)."""

    body: dict[str, Any]
    model: str
    price: ModelPrice
    markup: Fraction | None = None
    endpoint: str = EMBEDDINGS

    def input_tokens(self, counter: TokenCounter) -> int:
        return counter.count_prompt(self.model, self.body["input"])

    def least_input_tokens(self, counter: TokenCounter) -> int:
        return counter.least_prompt(self.model, self.body["input"])

    def plan(self, input_tokens: int, min_output_tokens: int) -> ReservationPlan:
        return ReservationPlan(self.price, input_tokens, 0, 0, markup=self.markup)

    def upstream_body(self, model: str) -> dict[str, Any]:
        """The client's body untouched (encoding_format, dimensions, user), `model` as the upstream names it."""
        return {**self.body, "model": model}


def _token_array(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value)
    )


def embeddings_request(
    body: dict[str, Any], model: str, price: ModelPrice, *, markup: Fraction | None = None
) -> EmbeddingsRequest:
    value = body.get("input")
    valid = (
        (isinstance(value, str) and value != "")
        or _token_array(value)
        or (
            isinstance(value, list)
            and 0 < len(value) <= MAX_EMBEDDING_INPUTS
            and (all(isinstance(v, str) and v != "" for v in value) or all(_token_array(v) for v in value))
        )
    )
    if not valid:
        raise RequestError(
            "'input' must be a non-empty string, an array of non-empty strings, an array of token ids or an array "
            f"of token id arrays (at most {MAX_EMBEDDING_INPUTS} inputs)."
        )
    return EmbeddingsRequest(body, model, price, markup)


@dataclass(frozen=True)
class ImagesRequest:
    """A validated image generation request: `n` images at a per-request price each."""

    body: dict[str, Any]
    model: str
    per_image: int
    n: int
    endpoint: str = IMAGES

    def input_tokens(self, counter: TokenCounter) -> int:
        return 0  # not priced by tokens: nothing to count

    def least_input_tokens(self, counter: TokenCounter) -> int:
        return 0

    def plan(self, input_tokens: int, min_output_tokens: int) -> ReservationPlan:
        return ReservationPlan(ModelPrice(0, 0), 0, 0, 0, fixed=self.per_image * self.n)

    def upstream_body(self, model: str) -> dict[str, Any]:
        return {**self.body, "model": model}


def images_request(body: dict[str, Any], model: str, per_image: int) -> ImagesRequest:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("'prompt' must be a non-empty string.")
    if body.get("stream") not in (None, False):
        raise RequestError("Streamed image generation is not served here: leave 'stream' unset.")
    n = _positive_int(body, "n", MAX_IMAGES) or 1
    return ImagesRequest(body, model, per_image, n)


# --- reading answers --------------------------------------------------------------------------


# The string fields of a message that carry generated text, in the order a model writes them.
_MESSAGE_TEXT_FIELDS = ("reasoning_content", "content", "refusal")


def _message_text(body: dict[str, Any]) -> list[str]:
    """Content, reasoning, refusals, tool names and arguments of a message or a delta."""
    parts = [body[key] for key in _MESSAGE_TEXT_FIELDS if isinstance(body.get(key), str)]
    for call in body.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
    return parts


def generated_text(data: dict[str, Any], part: str) -> str:
    """The text the choices of a completion (part "message") or of a stream chunk (part "delta")
    carry; "text" for legacy completions. What is metered when the upstream reports no usage."""
    parts: list[str] = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):  # legacy completions
            parts.append(choice["text"])
        body = choice.get(part)
        if isinstance(body, dict):
            parts += _message_text(body)
    return "".join(parts)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _usd(value: Any) -> Decimal | None:
    """A reported cost: a JSON number at or above 0, exact as its text (str of the parsed float
    is its shortest round-trip text, so 0.1 stays 0.1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        return None
    amount = Decimal(str(value))
    return amount if amount.is_finite() else None


def reported_usage(data: dict[str, Any], *, output: bool = True) -> Usage | None:
    """The `usage` object of a completion or a stream chunk, if it has valid token counts (an
    embeddings answer has no output: `output=False`), with its `cost` when it carries one."""
    usage = data.get("usage")
    if isinstance(usage, dict):
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens")) if output else 0
        if prompt is not None and completion is not None:
            return Usage(prompt, completion, UsageSource.UPSTREAM, _usd(usage.get("cost")))
    return None


def stream_identity(chunk: dict[str, Any]) -> dict[str, Any]:
    """The fields every chunk of a stream repeats, for chunks we write into it ourselves."""
    return {k: chunk[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in chunk}


def chunk_indexes(chunk: dict[str, Any]) -> list[int]:
    """The choice indexes a stream chunk carries."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [c["index"] for c in choices if isinstance(c, dict) and isinstance(c.get("index"), int)]


# --- cutting an answer to its budget ----------------------------------------------------------


class _Budget:
    """Tokens left for one choice; `take` keeps what of a text fits and spends it."""

    def __init__(self, encoding: tiktoken.Encoding, tokens: int) -> None:
        self.encoding = encoding
        self.left = tokens
        self.cut = False

    def take(self, text: str) -> str:
        kept, count = fit_prefix(self.encoding, text, self.left)
        self.left -= count
        self.cut = self.cut or len(kept) < len(text)
        return kept


def _trim_message(message: dict[str, Any], budget: _Budget) -> dict[str, Any]:
    """The message with each of its texts (those `generated_text` meters) cut to what fits;
    tool calls of which nothing fits are dropped."""
    trimmed = dict(message)
    for key in _MESSAGE_TEXT_FIELDS:
        if isinstance(message.get(key), str):
            trimmed[key] = budget.take(message[key])
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        kept_calls = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                kept_calls.append(call)
                continue
            function = dict(function)
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    function[key] = budget.take(function[key])
            if function.get("name") or function.get("arguments"):
                kept_calls.append({**call, "function": function})
        trimmed["tool_calls"] = kept_calls or None
    return trimmed


def _trim_choice(choice: dict[str, Any], budget: _Budget) -> dict[str, Any]:
    trimmed = dict(choice)
    if isinstance(choice.get("text"), str):  # legacy completions
        trimmed["text"] = budget.take(choice["text"])
    if isinstance(choice.get("message"), dict):
        trimmed["message"] = _trim_message(choice["message"], budget)
    if budget.cut:
        trimmed["finish_reason"] = "length"
    return trimmed


def trim_completion(data: dict[str, Any], encoding: tiktoken.Encoding, budget: int) -> dict[str, Any]:
    """A copy of the completion `data` whose generated text is at most `budget` tokens, for an
    upstream that ignored max_tokens: cut as a model cuts at max_tokens, as a stream is cut at
    the budget. Each choice gets an equal share of what the choices before it left, so one long
    choice cannot starve the others; a choice whose text was cut ends with finish_reason
    "length". Counting stays bounded by the budget, whatever the answer's size (`fit_prefix`).
    The `usage` object is left as it was: the caller replaces it with its own counts."""
    choices = data.get("choices")
    if not isinstance(choices, list):
        return dict(data)
    trimmed: list[Any] = []
    left = budget
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            trimmed.append(choice)
            continue
        share = left // (len(choices) - position)
        choice_budget = _Budget(encoding, share)
        trimmed.append(_trim_choice(choice, choice_budget))
        left -= share - choice_budget.left
    return {**data, "choices": trimmed}


# --- chunks the provider writes ---------------------------------------------------------------


def length_chunk(identity: dict[str, Any], index: int, *, chat: bool) -> dict[str, Any]:
    """The last chunk of a choice cut at the budget, as a model ends one at max_tokens."""
    if chat:
        choice: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "length"}
    else:
        choice = {"text": "", "index": index, "logprobs": None, "finish_reason": "length"}
    return _chunk(identity, chat=chat, choices=[choice])


def usage_object(usage: Usage) -> dict[str, int]:
    """`usage` as OpenAI writes it, for answers and chunks that carry our own counts."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def usage_chunk(identity: dict[str, Any], usage: Usage, *, chat: bool) -> dict[str, Any]:
    return _chunk(identity, chat=chat, choices=[], usage=usage_object(usage))


def _chunk(identity: dict[str, Any], *, chat: bool, **fields: Any) -> dict[str, Any]:
    default_object = "chat.completion.chunk" if chat else "text_completion"
    return {"id": "", "object": default_object, "created": 0, "model": "", **identity, **fields}


def error_body(message: str, code: str, type_: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}
