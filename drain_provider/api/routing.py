"""The models sold, each with the upstream client that serves it: what a paid request looks up.

`Routes` holds the catalog (catalog.py) and one `Upstream` per upstream it names, all on the
app's one aiohttp session; SIGHUP replaces both at once (`reload`): a request reads them once,
so it never mixes an old route with a new upstream. A known model is one dict lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from ..catalog import ENDPOINTS, Catalog, Kind, ModelRoute
from ..config import Settings
from ..openai_format import RequestError
from ..upstream import Upstream

log = logging.getLogger(__name__)


def make_upstreams(
    session: aiohttp.ClientSession,
    catalog: Catalog,
    settings: Settings,
    current: Mapping[str, Upstream] | None = None,
    *,
    timeout: float | None = None,
) -> dict[str, Upstream]:
    """One client per upstream of `catalog`; one of `current` that already calls the same URL
    with the same key is kept (with its health)."""
    upstreams = {}
    for name, spec in catalog.upstreams.items():
        kept = (current or {}).get(name)
        if kept is not None and kept.serves(spec.base_url, spec.api_key, spec.max_tokens_field):
            upstreams[name] = kept
            continue
        upstreams[name] = Upstream(
            session,
            spec.base_url,
            spec.api_key,
            timeout=settings.upstream_timeout if timeout is None else timeout,
            max_tokens_field=spec.max_tokens_field,
            max_answer_bytes=settings.max_answer_bytes,
            name=name,
        )
    return upstreams


class Routes:
    """The catalog and its upstream clients, replaced together."""

    def __init__(self, catalog: Catalog, upstreams: Mapping[str, Upstream]) -> None:
        self._set(catalog, upstreams)

    def _set(self, catalog: Catalog, upstreams: Mapping[str, Upstream]) -> None:
        served = {name: (route, upstreams[route.upstream]) for name, route in catalog.names.items()}
        # One attribute, swapped whole: a reader that took it keeps a consistent view.
        self._state = (catalog, dict(upstreams), served)

    @property
    def catalog(self) -> Catalog:
        return self._state[0]

    @property
    def upstreams(self) -> dict[str, Upstream]:
        return self._state[1]

    def __contains__(self, name: object) -> bool:
        """Whether `name` is sold (a model or an alias), on any endpoint."""
        return name in self._state[2]

    def find(self, model: Any, kind: Kind) -> tuple[ModelRoute, Upstream]:
        """The route and upstream of the model a request names, for an endpoint of `kind`;
        RequestError (the code and message the client sees) if it is not sold there."""
        if not isinstance(model, str) or not model:
            raise RequestError("'model' is required and must be a string.")
        served = self._state[2].get(model)
        if served is None:
            raise RequestError(
                f"Model '{model[:100]}' is not available here; see GET /v1/models.", "model_not_supported"
            )
        if served[0].kind is not kind:
            raise RequestError(
                f"Model '{model[:100]}' is sold on {ENDPOINTS[served[0].kind]}, not on this endpoint.",
                "model_not_supported",
            )
        return served

    def reload(self, catalog: Catalog, session: aiohttp.ClientSession, settings: Settings) -> None:
        """Serve `catalog` from now on, with a new client for each new or changed upstream."""
        self._set(catalog, make_upstreams(session, catalog, settings, self.upstreams))
