"""Secrets (the provider key, the upstream API key) never reach a response or a log line."""

from __future__ import annotations

import logging
from pathlib import Path

import openai
import pytest
from helpers import ChannelFactory, ProviderFactory, free_port, paid_chat
from test_startup import ENV, cli

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


def test_the_database_url_password_never_reaches_the_log(tmp_path: Path) -> None:
    """The start-up line names the ledger (engine and where) and a PostgreSQL server that is not
    there stops the start: neither shows DATABASE_URL's password, at any log level (the log hides
    the user too, as it does in every URL). The SQLite ledger is named by its path."""
    password = "pg-Passw0rd-SECRET"
    port = free_port()
    url = f"postgresql://drain:{password}@127.0.0.1:{port}/drain"
    run = cli(["serve"], {**ENV, "DATABASE_URL": url, "LOG_LEVEL": "DEBUG"}, tmp_path)
    assert run.returncode == 2
    assert f"ledger=postgresql ledger_at=postgresql://***@127.0.0.1:{port}/drain " in run.stderr
    assert "SECRET" not in run.stderr + run.stdout
    (tmp_path / "ledger.db").mkdir()  # a ledger that cannot be opened: the start stops after the line
    run = cli(["serve"], {**ENV, "DATABASE_PATH": "ledger.db", "LOG_LEVEL": "INFO"}, tmp_path)
    assert run.returncode == 2 and "ledger=sqlite ledger_at=ledger.db " in run.stderr
