"""`openai_format.trim_completion`: an answer from an upstream that ignored max_tokens is cut as
a model cuts at max_tokens, within the budget, with counting bounded by the budget."""

from __future__ import annotations

import copy
from typing import Any

import tiktoken
from helpers import CountingEncoding

from drain_provider.openai_format import generated_text, trim_completion
from drain_provider.tokens import OFFLINE_ENCODING, longest_token_bytes

ENCODING = tiktoken.get_encoding(OFFLINE_ENCODING)
LONG = " ".join(f"word{i}" for i in range(200))


def n(text: str) -> int:
    return len(ENCODING.encode(text, disallowed_special=()))


def chat(*contents: str, finish: str = "stop") -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": c}, "logprobs": None, "finish_reason": finish}
        for i, c in enumerate(contents)
    ]
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "demo", "choices": choices, "usage": {"x": 1}}


def test_an_answer_that_fits_is_unchanged() -> None:
    answer = chat("Hello there.", "General Kenobi.")
    assert trim_completion(answer, ENCODING, 100) == answer


def test_a_long_choice_is_cut_to_the_budget_and_ends_with_length() -> None:
    answer = chat(LONG)
    before = copy.deepcopy(answer)
    trimmed = trim_completion(answer, ENCODING, 25)
    assert answer == before  # a copy: the upstream's answer is not changed
    message = trimmed["choices"][0]["message"]
    assert LONG.startswith(message["content"]) and n(message["content"]) == 25
    assert message["role"] == "assistant"
    assert trimmed["choices"][0]["finish_reason"] == "length"
    assert trimmed["id"] == "chatcmpl-1" and trimmed["usage"] == {"x": 1}  # the caller replaces usage


def test_the_choices_share_the_budget() -> None:
    trimmed = trim_completion(chat(LONG, LONG), ENCODING, 40)
    texts = [c["message"]["content"] for c in trimmed["choices"]]
    assert [n(t) for t in texts] == [20, 20]
    assert [c["finish_reason"] for c in trimmed["choices"]] == ["length", "length"]


def test_a_short_choice_leaves_its_share_to_the_next() -> None:
    trimmed = trim_completion(chat("Short.", LONG), ENCODING, 40)
    first, second = trimmed["choices"]
    assert (first["message"]["content"], first["finish_reason"]) == ("Short.", "stop")
    assert n(second["message"]["content"]) == 40 - n("Short.") and second["finish_reason"] == "length"


def test_legacy_text_is_cut() -> None:
    answer = {"object": "text_completion", "choices": [{"text": LONG, "index": 0, "finish_reason": "stop"}]}
    trimmed = trim_completion(answer, ENCODING, 9)
    assert LONG.startswith(trimmed["choices"][0]["text"]) and n(trimmed["choices"][0]["text"]) == 9
    assert trimmed["choices"][0]["finish_reason"] == "length"


def test_reasoning_and_tool_calls_count_and_are_cut_in_the_order_they_are_written() -> None:
    calls: list[dict[str, Any]] = [
        {"id": "a", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "' + LONG + '"}'}},
        {"id": "b", "type": "function", "function": {"name": "never", "arguments": "{}"}},
    ]
    message = {"role": "assistant", "reasoning_content": "Think first.", "content": None, "tool_calls": calls}
    answer = {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
    trimmed = trim_completion(answer, ENCODING, 30)
    cut = trimmed["choices"][0]["message"]
    assert cut["reasoning_content"] == "Think first." and cut["content"] is None
    assert [c["id"] for c in cut["tool_calls"]] == ["a"]  # nothing of the second call fits: dropped
    assert cut["tool_calls"][0]["function"]["name"] == "lookup"
    assert calls[0]["function"]["arguments"].startswith(cut["tool_calls"][0]["function"]["arguments"])
    assert trimmed["choices"][0]["finish_reason"] == "length"
    assert n(generated_text(trimmed, "message")) <= 30


def test_counting_a_huge_answer_costs_what_the_budget_does() -> None:
    encoding = CountingEncoding()
    huge = "Lorem ipsum dolor sit amet. " * 400_000  # about 11 MB
    trimmed = trim_completion(chat(huge, huge), encoding, 60)  # type: ignore[arg-type]
    assert [n(c["message"]["content"]) for c in trimmed["choices"]] == [30, 30]
    assert encoding.encoded_bytes <= 2 * 3 * 31 * longest_token_bytes(ENCODING)


def test_answers_without_choices_are_left_alone() -> None:
    assert trim_completion({"error": "x"}, ENCODING, 5) == {"error": "x"}
    odd = {"choices": ["not a dict", {"index": 1, "message": "nor is this"}]}
    assert trim_completion(odd, ENCODING, 5) == odd
