"""Relaying a completion from the upstream, and metering it.

This module knows tokens and the OpenAI wire format, not vouchers: it is told how many output
tokens a request may produce and reports how many it did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .tokens import TokenCounter

MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    source: str  # "upstream": reported by the upstream; "local": counted by us


def requested_output_tokens(body: dict[str, Any]) -> int | None:
    """The client's own output limit, per choice (validated by the API before this is called)."""
    limits = [body[field] for field in MAX_TOKEN_FIELDS if body.get(field) is not None]
    return min(limits) if limits else None


def upstream_body(body: dict[str, Any], output_cap: int, default_field: str) -> dict[str, Any]:
    """The request as sent upstream: the client's body with its output limit lowered to what the
    reservation pays for. The client's own field is kept; if it gave none, `default_field`."""
    capped = dict(body)
    fields = [field for field in MAX_TOKEN_FIELDS if body.get(field) is not None] or [default_field]
    for field in fields:
        capped[field] = min(body.get(field) or output_cap, output_cap)
    return capped


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def completion_text(data: dict[str, Any]) -> str:
    """Everything a completion produced, for counting when the upstream reports no usage."""
    parts: list[str] = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):  # legacy completions
            parts.append(choice["text"])
        message = choice.get("message")
        if isinstance(message, dict):
            for key in ("content", "reasoning_content", "refusal"):
                if isinstance(message.get(key), str):
                    parts.append(message[key])
            if message.get("tool_calls"):
                parts.append(json.dumps(message["tool_calls"], separators=(",", ":")))
    return "".join(parts)


def response_usage(data: dict[str, Any], counter: TokenCounter, model: str, counted_input: int) -> Usage:
    """Usage as the upstream reports it; where it does not, our own count."""
    usage = data.get("usage")
    if isinstance(usage, dict):
        prompt = _int_or_none(usage.get("prompt_tokens"))
        completion = _int_or_none(usage.get("completion_tokens"))
        if prompt is not None and completion is not None:
            return Usage(prompt, completion, "upstream")
    return Usage(counted_input, counter.count_text(model, completion_text(data)), "local")
