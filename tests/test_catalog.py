"""The routing file (MODELS_FILE), parsed and validated by catalog.py and loaded by config.py:
TOML, YAML and JSON give the same catalog; every bad file is one line naming the key path and
the rule, never a value; the flat settings give the same kind of catalog without a file."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from drain_provider.catalog import CatalogError, Kind, ModelRoute, parse_catalog, read_catalog
from drain_provider.config import ConfigError, load_catalog, load_settings
from drain_provider.pricing import ModelPrice

SECRET = "sk-or-SECRET-0123456789abcdef"
ENV = {"OPENROUTER_API_KEY": SECRET}

TOML = """
[upstreams.openrouter]
base_url = "https://openrouter.ai/api/v1"
api_key_env = "OPENROUTER_API_KEY"
[upstreams.local]
base_url = "http://127.0.0.1:11434/v1/"

[models."llama-3.1-70b"]
upstream = "openrouter"
upstream_model = "meta-llama/llama-3.1-70b-instruct"
aliases = ["llama-70b"]
price = { input = 900, output = 900 }
[models."gpt-4o"]
upstream = "openrouter"
upstream_model = "openai/gpt-4o"
price = { input = 7500, output = 22500 }
markup = "1.25"
[models.qwen]
upstream = "local"
price = { input = 0, output = 0 }
[models."text-embedding-3-small"]
upstream = "openrouter"
kind = "embeddings"
price = { input = 30 }
[models."dall-e-3"]
upstream = "local"
kind = "images"
per_request = 40000
"""

DATA: dict[str, Any] = {
    "upstreams": {
        "openrouter": {"base_url": "https://openrouter.ai/api/v1", "api_key_env": "OPENROUTER_API_KEY"},
        "local": {"base_url": "http://127.0.0.1:11434/v1/"},
    },
    "models": {
        "llama-3.1-70b": {
            "upstream": "openrouter",
            "upstream_model": "meta-llama/llama-3.1-70b-instruct",
            "aliases": ["llama-70b"],
            "price": {"input": 900, "output": 900},
        },
        "gpt-4o": {
            "upstream": "openrouter",
            "upstream_model": "openai/gpt-4o",
            "price": {"input": 7500, "output": 22500},
            "markup": "1.25",
        },
        "qwen": {"upstream": "local", "price": {"input": 0, "output": 0}},
        "text-embedding-3-small": {"upstream": "openrouter", "kind": "embeddings", "price": {"input": 30}},
        "dall-e-3": {"upstream": "local", "kind": "images", "per_request": 40000},
    },
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_yaml_and_json_give_the_same_catalog(tmp_path: Path) -> None:
    toml = read_catalog(write(tmp_path, "models.toml", TOML), ENV)
    assert read_catalog(write(tmp_path, "models.yaml", yaml.safe_dump(DATA)), ENV) == toml
    assert read_catalog(write(tmp_path, "models.yml", yaml.safe_dump(DATA)), ENV) == toml
    assert read_catalog(write(tmp_path, "models.json", json.dumps(DATA)), ENV) == toml
    assert not toml.derived
    assert list(toml.upstreams) == ["openrouter", "local"]
    openrouter, local = toml.upstreams["openrouter"], toml.upstreams["local"]
    assert openrouter.api_key == SECRET and openrouter.max_tokens_field == "max_tokens"
    assert local.base_url == "http://127.0.0.1:11434/v1" and local.api_key is None
    assert SECRET not in repr(toml)
    assert list(toml.names) == sorted(
        ["llama-3.1-70b", "llama-70b", "gpt-4o", "qwen", "text-embedding-3-small", "dall-e-3"]
    )
    assert toml.get("llama-70b") is toml.get("llama-3.1-70b")
    assert toml.alias_of("llama-70b") == "llama-3.1-70b" and toml.alias_of("qwen") is None
    assert toml.routes["qwen"] == ModelRoute("qwen", "local", "qwen", Kind.CHAT, ModelPrice(0, 0))
    assert toml.routes["gpt-4o"].markup_ratio == Fraction(5, 4)
    assert toml.routes["text-embedding-3-small"].price == ModelPrice(30, 0)
    assert toml.routes["dall-e-3"].per_request == 40000
    assert toml.prices["llama-70b"] == ModelPrice(900, 900)


def test_openai_gets_max_completion_tokens_and_needs_a_key() -> None:
    data: dict[str, Any] = {
        "upstreams": {"openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "K"}},
        "models": {"m": {"price": {"input": 1, "output": 1}}},
    }
    catalog = parse_catalog(data, {"K": SECRET})
    assert catalog.upstreams["openai"].max_tokens_field == "max_completion_tokens"
    assert catalog.routes["m"].upstream == "openai"  # the only upstream: `upstream` may be left out
    del data["upstreams"]["openai"]["api_key_env"]
    with pytest.raises(
        CatalogError, match=r"^MODELS_FILE: upstreams\.openai\.api_key_env: required for api\.openai\.com$"
    ):
        parse_catalog(data, {})


def bad(change: dict[str, Any]) -> dict[str, Any]:
    """DATA with `change` merged in at the top (a None value deletes the key), one level down."""
    data: dict[str, Any] = json.loads(json.dumps(DATA))
    for section, entries in change.items():
        if entries is None:
            del data[section]
            continue
        for name, value in entries.items():
            if value is None:
                data[section].pop(name, None)
            elif isinstance(value, dict) and isinstance(data[section].get(name), dict):
                data[section][name].update(value)
                data[section][name] = {k: v for k, v in data[section][name].items() if v is not None}
            else:
                data[section][name] = value
    return data


BAD_FILES: list[tuple[dict[str, Any], str]] = [
    (
        {"upstreams": {"openrouter": {"api_key_env": "MISSING_KEY"}}},
        "upstreams.openrouter.api_key_env: the variable MISSING_KEY is not set",
    ),
    (
        {"upstreams": {"openrouter": {"api_key_env": SECRET + "!"}}},
        "upstreams.openrouter.api_key_env: must name an environment variable",
    ),
    (
        {"upstreams": {"openrouter": {"base_url": "ftp://x"}}},
        "upstreams.openrouter.base_url: must be an http:// or https:// URL with a host",
    ),
    (
        {"upstreams": {"openrouter": {"base_url": f"https://u:{SECRET}@openrouter.ai/v1"}}},
        "upstreams.openrouter.base_url: no credentials",
    ),
    (
        {"upstreams": {"openrouter": {"base_url": f"https://openrouter.ai/v1?key={SECRET}"}}},
        "upstreams.openrouter.base_url: no credentials",
    ),
    ({"upstreams": {"openrouter": {"base_url": "http://[::1"}}}, "upstreams.openrouter.base_url: is not a valid URL"),
    ({"upstreams": {"openrouter": {"max_tokens_field": "n"}}}, "upstreams.openrouter.max_tokens_field: must be"),
    ({"upstreams": {"openrouter": {"api_key": SECRET}}}, "upstreams.openrouter.api_key: unknown key"),
    ({"upstreams": {"bad name": {"base_url": "http://x"}}}, "upstreams.<key>: an upstream name is"),
    ({"upstreams": None}, "upstreams: at least one upstream is required"),
    ({"models": None}, "models: at least one model is required"),
    ({"models": {"qwen": {"upstream": "nowhere"}}}, "models.qwen.upstream: no such upstream"),
    ({"models": {"qwen": {"upstream": None}}}, "models.qwen.upstream: required when there are several upstreams"),
    ({"models": {"qwen": {"price": {"input": 1.5, "output": 1}}}}, "models.qwen.price.input: must be a whole number"),
    ({"models": {"qwen": {"price": {"input": "900", "output": 1}}}}, "models.qwen.price.input: must be a whole number"),
    ({"models": {"qwen": {"price": {"input": True, "output": 1}}}}, "models.qwen.price.input: must be a whole number"),
    ({"models": {"qwen": {"price": {"input": -1, "output": 1}}}}, "models.qwen.price.input: out of range"),
    ({"models": {"qwen": {"price": {"input": 2**63, "output": 1}}}}, "models.qwen.price.input: out of range"),
    ({"models": {"qwen": {"price": {"input": 1}}}}, "models.qwen.price.output: required"),
    ({"models": {"qwen": {"price": None}}}, "models.qwen.price: required"),
    ({"models": {"qwen": {"price": {"input": 1, "output": 1, "cached": 1}}}}, "models.qwen.price.cached: unknown key"),
    ({"models": {"qwen": {"colour": "red"}}}, "models.qwen.colour: unknown key"),
    ({"models": {"qwen": {SECRET: 1}}}, "models.qwen.<key>: unknown key"),
    ({"models": {"qwen": {"kind": "audio"}}}, "models.qwen.kind: must be chat, embeddings or images"),
    ({"models": {"qwen": {"per_request": 5}}}, "models.qwen.per_request: only for kind = images"),
    ({"models": {"qwen": {"markup": 1.25}}}, "models.qwen.markup: must be a decimal string"),
    ({"models": {"qwen": {"markup": "0"}}}, "models.qwen.markup: must be a decimal string above 0"),
    ({"models": {"qwen": {"markup": "-1"}}}, "models.qwen.markup: must be a decimal string"),
    ({"models": {"qwen": {"markup": "1.1234567"}}}, "models.qwen.markup: must be a decimal string"),
    ({"models": {"qwen": {"markup": "1e3"}}}, "models.qwen.markup: must be a decimal string"),
    ({"models": {"qwen": {"aliases": "q"}}}, "models.qwen.aliases: must be a list of names"),
    ({"models": {"qwen": {"aliases": ["ok", " bad"]}}}, "models.qwen.aliases: entry 2 is not a valid model name"),
    ({"models": {"qwen": {"aliases": ["gpt-4o"]}}}, 'models.qwen.aliases: "gpt-4o" is a model\'s name'),
    (
        {"models": {"qwen": {"aliases": ["llama-70b"]}}},
        'models.qwen.aliases: "llama-70b" is already an alias of "llama-3.1-70b"',
    ),
    ({"models": {"qwen": {"aliases": ["q", "q"]}}}, 'models.qwen.aliases: "q" is already an alias of "qwen"'),
    ({"models": {"qwen": {"upstream_model": ""}}}, "models.qwen.upstream_model: must be a non-empty string"),
    ({"models": {"dall-e-3": {"per_request": None}}}, 'models."dall-e-3".per_request: required for images'),
    ({"models": {"dall-e-3": {"price": {"input": 1, "output": 1}}}}, 'models."dall-e-3".price: not for images'),
    ({"models": {"dall-e-3": {"markup": "2"}}}, 'models."dall-e-3".markup: not for images'),
    (
        {"models": {"text-embedding-3-small": {"price": {"input": 1, "output": 1}}}},
        'models."text-embedding-3-small".price.output: unknown key',
    ),
    ({"models": {"bad name!": {"price": {"input": 1, "output": 1}}}}, "models.<key>: a model name is"),
    ({"models": {"qwen": "cheap"}}, "models.qwen: must be a table"),
]


@pytest.mark.parametrize(("change", "expected"), BAD_FILES)
def test_a_bad_file_is_one_line_naming_its_key_path(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(bad(change), ENV)
    message = str(info.value)
    assert message.startswith("MODELS_FILE: " + expected), message
    assert "\n" not in message and "SECRET" not in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("models.toml", "[upstreams.a]\nbase_url = \n", "MODELS_FILE: not valid TOML (line 2)"),
        ("models.toml", "[models.a]\nx = 1\n[models.a]\ny = 2\n", "MODELS_FILE: not valid TOML"),
        ("models.yaml", "upstreams: [\n", "MODELS_FILE: not valid YAML"),
        ("models.yaml", "models:\n  a: 1\n  a: 2\n", "MODELS_FILE: line 3: a key is given twice"),
        ("models.json", '{"models": {"a": {}, "a": {}}}', "MODELS_FILE: a key is given twice in one object"),
        ("models.json", "{" + SECRET, "MODELS_FILE: not valid JSON (line 1)"),
        ("models.json", "[]", "MODELS_FILE: the file must hold a table"),
        ("models.json", '{"upstream": {}}', "MODELS_FILE: upstream: unknown key"),
        ("models.ini", "", "MODELS_FILE: the file name must end in .toml, .yaml, .yml or .json"),
        ("missing.toml", None, "MODELS_FILE: cannot read the file (No such file or directory)"),
    ],
)
def test_a_file_that_does_not_parse_says_where_not_what(
    tmp_path: Path, name: str, text: str | None, expected: str
) -> None:
    path = tmp_path / name if text is None else write(tmp_path, name, text)
    with pytest.raises(CatalogError) as info:
        read_catalog(path, ENV)
    assert str(info.value).startswith(expected) and "SECRET" not in str(info.value)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=12,
    )
)
def test_any_document_is_a_catalog_or_one_catalog_error(data: Any) -> None:
    """Whatever the file holds: a catalog, or a CatalogError, never another exception."""
    document = {"upstreams": {"a": {"base_url": "http://x"}}, "models": data}
    for candidate in (data, document, {"upstreams": data, "models": {"m": {"price": {"input": 1, "output": 1}}}}):
        try:
            parse_catalog(candidate, ENV)
        except CatalogError as exc:
            assert "\n" not in str(exc)


BASE = {
    "PROVIDER_PRIVATE_KEY": "0x" + "11" * 32,
    "CHAIN_ID": "137",
    **ENV,
}


def test_settings_with_models_file(tmp_path: Path) -> None:
    path = write(tmp_path, "models.toml", TOML)
    settings = load_settings({**BASE, "MODELS_FILE": str(path), "PRICE_GPT_4O_INPUT": "100"})
    catalog = settings.catalog
    assert not catalog.derived and set(catalog.upstreams) == {"openrouter", "local"}
    # The PRICE_ variables still override the file's per-token prices; nothing else is sold.
    assert catalog.routes["gpt-4o"].price == ModelPrice(100, 22500)
    assert set(settings.prices) == set(catalog.names) and "gpt-4o-mini" not in settings.prices
    assert load_catalog({**BASE, "MODELS_FILE": str(path)}, settings).routes["gpt-4o"].price == ModelPrice(7500, 22500)
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"UPSTREAM_BASE_URL": "http://localhost:8000/v1"}, "UPSTREAM_BASE_URL: not used with MODELS_FILE"),
        ({"PRICING_FILE": "prices.json"}, "PRICING_FILE: not used with MODELS_FILE"),
        (
            {"OPENROUTER_API_KEY": ""},
            "MODELS_FILE: upstreams.openrouter.api_key_env: the variable OPENROUTER_API_KEY is not set",
        ),
        ({"PRICE_QWEN_INPUT": "SECRET"}, "PRICE_QWEN_INPUT: must be a whole number"),
    ],
)
def test_models_file_settings_that_conflict(tmp_path: Path, extra: dict[str, str], expected: str) -> None:
    path = write(tmp_path, "models.toml", TOML)
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "MODELS_FILE": str(path), **extra})
    assert str(info.value).startswith(expected) and "SECRET" not in str(info.value)


def test_without_a_file_the_catalog_is_derived_from_the_flat_settings() -> None:
    settings = load_settings({**BASE, "UPSTREAM_BASE_URL": "http://localhost:8000/v1", "PRICE_GPT_4O_INPUT": "1"})
    catalog = settings.catalog
    assert catalog.derived and list(catalog.upstreams) == ["default"]
    assert catalog.upstreams["default"].base_url == "http://localhost:8000/v1"
    assert set(catalog.names) == {"gpt-4o", "gpt-4o-mini", "gpt-4-turbo", "gpt-3.5-turbo"}
    assert catalog.routes["gpt-4o"] == ModelRoute("gpt-4o", "default", "gpt-4o", price=ModelPrice(1, 22500))
    openai = load_settings({**BASE, "OPENAI_API_KEY": SECRET}).catalog.upstreams["default"]
    assert openai.max_tokens_field == "max_completion_tokens" and openai.api_key == SECRET
