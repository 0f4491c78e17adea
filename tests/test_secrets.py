"""Secrets (the provider key, the upstream API key) never reach a response or a log line."""

from __future__ import annotations

import logging

import openai
import pytest
from helpers import ChannelFactory, ProviderFactory, paid_chat

API_KEY = "sk-test-0123456789abcdefSECRET"


@pytest.mark.parametrize("status", [400, 401, 500])
async def test_upstream_errors_never_leak_the_api_key(
    provider_factory: ProviderFactory, open_channel: ChannelFactory, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    with caplog.at_level(logging.DEBUG):
        provider = await provider_factory(openai_api_key=API_KEY)
        consumer = await open_channel(provider)
        await paid_chat(provider.client(), consumer)  # a good call, logged too
        with pytest.raises(openai.APIStatusError) as info:
            await paid_chat(provider.client(), consumer, content=f'!demo {{"status": {status}, "echo_key": true}}')
    response = info.value.response
    assert response.status_code == 502
    text = response.text + str(dict(response.headers))
    assert "SECRET" not in text and API_KEY not in text
    if status == 400:  # the upstream's message is useful to the client, minus the key
        assert "demo upstream error 400" in response.json()["error"]["message"]
        assert "[redacted]" in response.json()["error"]["message"]
    private_key = provider.settings.provider_private_key.hex()
    assert API_KEY not in caplog.text
    assert private_key not in caplog.text and private_key.upper() not in caplog.text
    assert "paid channel=" in caplog.text  # the log did record the requests
