"""POST /v1/images/generations: a per-request price, `per_request` base units per image.

`n` images (1 by default) cost n times the price: reserved in full before the call, charged in
full when the upstream answers 200, nothing when it fails (502/504, as for every endpoint).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import openai_format
from ..catalog import Kind, ModelRoute
from ..openai_format import ImagesRequest
from .clients import limit_payment_failures
from .paid import begin, serve_json

routes = web.RouteTableDef()


def _parse(body: dict[str, Any], route: ModelRoute, asked: str) -> ImagesRequest:
    assert route.per_request is not None  # the catalog requires it of images
    return openai_format.images_request(body, asked, route.per_request)


@routes.post("/v1/images/generations")
@limit_payment_failures
async def generate_images(request: web.Request) -> web.StreamResponse:
    return await serve_json(await begin(request, Kind.IMAGES, _parse), lambda data: None)
