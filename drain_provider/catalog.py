"""What is sold and where it is bought: the models, their prices and aliases, and the upstreams.

A `Catalog` is read from the routing file (`MODELS_FILE`: TOML, YAML or JSON, by extension), or
built from the flat settings when there is none (`derived`: one upstream, `UPSTREAM_BASE_URL` with
`OPENAI_API_KEY`, every priced model under its own name), so that the rest of the code has one
path. Pure: the file's text and the environment come in, dataclasses come out.

Every problem is a `CatalogError` of one line naming the file's key path and the rule broken,
never a value: a key pasted in the wrong place must not reach a log. Model and upstream names are
quoted (they are public: /v1/models lists them) only once they pass the name rule.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from .pricing import ModelPrice

MAX_FILE_BYTES = 1024 * 1024
MAX_PRICE = 2**63 - 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")  # model names and aliases, as clients send them
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_KEY = re.compile(r"[a-z_]{1,40}")  # a key of ours, or one shown as unknown
_MARKUP = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
OPENAI_HOST = "api.openai.com"
DEFAULT_UPSTREAM = "default"  # the upstream of a derived catalog


class Kind(StrEnum):
    """The endpoint family a model is sold on."""

    CHAT = "chat"  # POST /v1/chat/completions and /v1/completions, per token
    EMBEDDINGS = "embeddings"  # POST /v1/embeddings, per input token
    IMAGES = "images"  # POST /v1/images/generations, per image


ENDPOINTS = {
    Kind.CHAT: "POST /v1/chat/completions",
    Kind.EMBEDDINGS: "POST /v1/embeddings",
    Kind.IMAGES: "POST /v1/images/generations",
}


class CatalogError(ValueError):
    """The routing file is wrong; the message names the key path and the rule, never a value."""


@dataclass(frozen=True)
class UpstreamSpec:
    """One OpenAI-compatible server. Its key is read from the environment variable the file names;
    it goes to this base URL only."""

    name: str
    base_url: str
    api_key_env: str | None  # the variable's name: what errors and doctor may say
    api_key: str | None = field(default=None, repr=False)
    max_tokens_field: str = "max_tokens"


@dataclass(frozen=True)
class ModelRoute:
    """One model sold: its public name, where it is bought, and how it is billed."""

    name: str
    upstream: str
    upstream_model: str
    kind: Kind = Kind.CHAT
    price: ModelPrice = field(default_factory=lambda: ModelPrice(0, 0))  # per 1k tokens (embeddings: input only)
    per_request: int | None = None  # images: base units per image
    markup: str | None = None  # pass-through: the upstream's reported cost times this (decimal text)
    aliases: tuple[str, ...] = ()

    @property
    def markup_ratio(self) -> Fraction | None:
        return None if self.markup is None else Fraction(Decimal(self.markup))


@dataclass(frozen=True)
class Catalog:
    upstreams: Mapping[str, UpstreamSpec]  # by name, in the file's order
    routes: Mapping[str, ModelRoute]  # by public name, sorted
    derived: bool = False  # built from the flat settings, not from MODELS_FILE
    # Every name sold (public names and aliases) to its route: the hot path's one lookup.
    names: Mapping[str, ModelRoute] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names: dict[str, ModelRoute] = {}
        for route in self.routes.values():
            for name in (route.name, *route.aliases):
                names[name] = route
        object.__setattr__(self, "names", dict(sorted(names.items())))

    def get(self, name: str) -> ModelRoute | None:
        return self.names.get(name)

    @property
    def prices(self) -> dict[str, ModelPrice]:
        """Every name sold (aliases too) and its per-token price (zero for images)."""
        return {name: route.price for name, route in self.names.items()}

    def alias_of(self, name: str) -> str | None:
        route = self.names.get(name)
        return None if route is None or route.name == name else route.name


def default_max_tokens_field(base_url: str) -> str:
    """OpenAI's own API wants max_completion_tokens (reasoning models refuse max_tokens); most
    OpenAI-compatible servers know only max_tokens."""
    return "max_completion_tokens" if urlparse(base_url).hostname == OPENAI_HOST else "max_tokens"


def derived_catalog(prices: Mapping[str, ModelPrice], base_url: str, api_key: str | None) -> Catalog:
    """The catalog of a provider without MODELS_FILE: one upstream, every priced model by name."""
    spec = UpstreamSpec(
        DEFAULT_UPSTREAM,
        base_url.rstrip("/"),
        "OPENAI_API_KEY" if api_key else None,
        api_key,
        default_max_tokens_field(base_url),
    )
    routes = {name: ModelRoute(name, DEFAULT_UPSTREAM, name, price=price) for name, price in sorted(prices.items())}
    return Catalog({DEFAULT_UPSTREAM: spec}, routes, derived=True)


# --- reading the file -------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice (PyYAML keeps the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise CatalogError(f"MODELS_FILE: line {key_node.start_mark.line + 1}: a key is given twice")
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CatalogError("MODELS_FILE: a key is given twice in one object")
        result[key] = value
    return result


def _parse_text(text: str, suffix: str) -> Any:
    """The document, by the file's extension; errors say where (line), never what."""
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line = re.search(r"line (\d+)", str(exc))
            raise CatalogError(f"MODELS_FILE: not valid TOML{f' (line {line[1]})' if line else ''}") from None
    if suffix in (".yaml", ".yml"):
        try:
            return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.MarkedYAMLError as exc:
            where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
            raise CatalogError(f"MODELS_FILE: not valid YAML{where}") from None
        except yaml.YAMLError:
            raise CatalogError("MODELS_FILE: not valid YAML") from None
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as exc:
            raise CatalogError(f"MODELS_FILE: not valid JSON (line {exc.lineno})") from None
    raise CatalogError("MODELS_FILE: the file name must end in .toml, .yaml, .yml or .json")


def read_catalog(path: Path, env: Mapping[str, str]) -> Catalog:
    """The catalog of the routing file at `path`, its keys read from `env`; CatalogError if not."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise CatalogError("MODELS_FILE: the file name must end in .toml, .yaml, .yml or .json")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"MODELS_FILE: cannot read the file ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise CatalogError(f"MODELS_FILE: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CatalogError("MODELS_FILE: not UTF-8 text") from None
    return parse_catalog(_parse_text(text, suffix), env)


# --- validating ---------------------------------------------------------------------------------


def _quote(key: object) -> str:
    """A key as a path segment: bare when simple, else quoted; a key that breaks every name rule
    is not shown at all (it could be anything, a secret too)."""
    if isinstance(key, str) and _KEY.fullmatch(key):
        return key
    if isinstance(key, str) and _NAME.fullmatch(key):
        return json.dumps(key)
    return "<key>"


def _path(*keys: object) -> str:
    return "MODELS_FILE: " + ".".join(_quote(key) for key in keys)


def _table(value: Any, *where: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CatalogError(f"{_path(*where)}: must be a table (an object)")
    return value


def _only(table: dict[str, Any], allowed: tuple[str, ...], *where: object) -> None:
    for key in table:
        if key not in allowed:
            shown = key if isinstance(key, str) and _KEY.fullmatch(key) else None  # a name of ours, mistyped
            raise CatalogError(f"{_path(*where, shown)}: unknown key (allowed: {', '.join(allowed)})")


def _text(value: Any, *where: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{_path(*where)}: must be a non-empty string")
    return value.strip()


def _price_value(value: Any, *where: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogError(f"{_path(*where)}: must be a whole number of USDC base units (7500 = $0.0075)")
    if not 0 <= value <= MAX_PRICE:
        raise CatalogError(f"{_path(*where)}: out of range")
    return value


def _base_url(value: Any, *where: object) -> str:
    url = _text(value, *where)
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise CatalogError(f"{_path(*where)}: is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise CatalogError(f"{_path(*where)}: must be an http:// or https:// URL with a host")
    if parsed.username or parsed.password or parsed.query or parsed.fragment:
        raise CatalogError(f"{_path(*where)}: no credentials, query or fragment: name the key in api_key_env")
    return url.rstrip("/")


def _upstream(name: Any, value: Any, env: Mapping[str, str]) -> UpstreamSpec:
    if not isinstance(name, str) or not _UPSTREAM_NAME.fullmatch(name):
        raise CatalogError(f"{_path('upstreams', name)}: an upstream name is letters, digits, - and _")
    table = _table(value, "upstreams", name)
    _only(table, ("base_url", "api_key_env", "max_tokens_field"), "upstreams", name)
    if "base_url" not in table:
        raise CatalogError(f"{_path('upstreams', name, 'base_url')}: required")
    base_url = _base_url(table["base_url"], "upstreams", name, "base_url")
    key_env = table.get("api_key_env")
    api_key = None
    if key_env is not None:
        if not isinstance(key_env, str) or not _ENV_NAME.fullmatch(key_env):
            raise CatalogError(
                f"{_path('upstreams', name, 'api_key_env')}: must name an environment variable (the key itself "
                "never goes in the file)"
            )
        api_key = env.get(key_env, "").strip()
        if not api_key:
            raise CatalogError(f"{_path('upstreams', name, 'api_key_env')}: the variable {key_env} is not set")
    elif urlparse(base_url).hostname == OPENAI_HOST:
        raise CatalogError(f"{_path('upstreams', name, 'api_key_env')}: required for {OPENAI_HOST}")
    field_name = table.get("max_tokens_field", default_max_tokens_field(base_url))
    if field_name not in MAX_TOKENS_FIELDS:
        raise CatalogError(
            f"{_path('upstreams', name, 'max_tokens_field')}: must be max_tokens or max_completion_tokens"
        )
    return UpstreamSpec(name, base_url, key_env, api_key, field_name)


_MODEL_KEYS = ("upstream", "upstream_model", "aliases", "kind", "price", "per_request", "markup")


def _model(name: Any, value: Any, upstreams: Mapping[str, UpstreamSpec]) -> ModelRoute:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CatalogError(
            f"{_path('models', name)}: a model name is 1 to 128 letters, digits and . _ - : / @ +, "
            "starting with a letter or digit"
        )
    where = ("models", name)
    table = _table(value, *where)
    _only(table, _MODEL_KEYS, *where)
    kind_text = table.get("kind", "chat")
    if kind_text not in tuple(Kind):
        raise CatalogError(f"{_path(*where, 'kind')}: must be chat, embeddings or images")
    kind = Kind(kind_text)
    if "upstream" in table:
        upstream = _text(table["upstream"], *where, "upstream")
        if upstream not in upstreams:
            raise CatalogError(f"{_path(*where, 'upstream')}: no such upstream in [upstreams]")
    elif len(upstreams) == 1:
        upstream = next(iter(upstreams))
    else:
        raise CatalogError(f"{_path(*where, 'upstream')}: required when there are several upstreams")
    upstream_model = _text(table["upstream_model"], *where, "upstream_model") if "upstream_model" in table else name
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list):
        raise CatalogError(f"{_path(*where, 'aliases')}: must be a list of names")
    for position, alias in enumerate(aliases):
        if not isinstance(alias, str) or not _NAME.fullmatch(alias):
            raise CatalogError(f"{_path(*where, 'aliases')}: entry {position + 1} is not a valid model name")
    price, per_request, markup = _billing(kind, table, where)
    return ModelRoute(name, upstream, upstream_model, kind, price, per_request, markup, tuple(aliases))


def _billing(kind: Kind, table: dict[str, Any], where: tuple[str, str]) -> tuple[ModelPrice, int | None, str | None]:
    """The price, the per-request price and the markup, each allowed only where it means something."""
    per_request = None
    price = ModelPrice(0, 0)
    if kind is Kind.IMAGES:
        for key in ("price", "markup"):
            if key in table:
                raise CatalogError(f"{_path(*where, key)}: not for images (they are priced by per_request)")
        if "per_request" not in table:
            raise CatalogError(f"{_path(*where, 'per_request')}: required for images (base units per image)")
        per_request = _price_value(table["per_request"], *where, "per_request")
        return price, per_request, None
    if "per_request" in table:
        raise CatalogError(f"{_path(*where, 'per_request')}: only for kind = images")
    if "price" not in table:
        raise CatalogError(f"{_path(*where, 'price')}: required (base units per 1k tokens)")
    sides = _table(table["price"], *where, "price")
    wanted = ("input",) if kind is Kind.EMBEDDINGS else ("input", "output")
    _only(sides, wanted, *where, "price")
    for side in wanted:
        if side not in sides:
            raise CatalogError(f"{_path(*where, 'price', side)}: required")
    price = ModelPrice(
        _price_value(sides["input"], *where, "price", "input"),
        _price_value(sides["output"], *where, "price", "output") if "output" in sides else 0,
    )
    markup = table.get("markup")
    return price, per_request, None if markup is None else _markup(markup, where)


def _markup(markup: Any, where: tuple[str, str]) -> str:
    rule = 'must be a decimal string above 0 with at most 6 digits each side of the point, like "1.25"'
    if not isinstance(markup, str) or not _MARKUP.fullmatch(markup.strip()) or Decimal(markup.strip()) <= 0:
        raise CatalogError(f"{_path(*where, 'markup')}: {rule}")
    return markup.strip()


def parse_catalog(data: Any, env: Mapping[str, str]) -> Catalog:
    """The catalog of a parsed routing file; CatalogError naming the first thing wrong."""
    if not isinstance(data, dict):
        raise CatalogError("MODELS_FILE: the file must hold a table with [upstreams] and [models]")
    _only(data, ("upstreams", "models"))
    upstream_tables = _table(data.get("upstreams"), "upstreams") if "upstreams" in data else {}
    if not upstream_tables:
        raise CatalogError("MODELS_FILE: upstreams: at least one upstream is required")
    upstreams = {name: _upstream(name, value, env) for name, value in upstream_tables.items()}
    model_tables = _table(data.get("models"), "models") if "models" in data else {}
    if not model_tables:
        raise CatalogError("MODELS_FILE: models: at least one model is required")
    routes = {name: _model(name, value, upstreams) for name, value in model_tables.items()}
    _check_names(routes)
    return Catalog(upstreams, dict(sorted(routes.items())), derived=False)


def _check_names(routes: Mapping[str, ModelRoute]) -> None:
    """Each name sold names one model: an alias is neither a model nor another alias."""
    owner: dict[str, str] = {name: name for name in routes}
    for route in routes.values():
        for alias in route.aliases:
            if alias in owner:
                other = owner[alias]
                what = "a model's name" if alias == other else f"already an alias of {json.dumps(other)}"
                raise CatalogError(f"{_path('models', route.name, 'aliases')}: {json.dumps(alias)} is {what}")
            owner[alias] = route.name
