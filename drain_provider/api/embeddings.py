"""POST /v1/embeddings: priced per input token (`price.input` per 1k), paid like a chat request.

The input is counted before the call (a string, strings, token arrays: as OpenAI takes it) and
reserved with no output; the request is charged on the upstream's `usage.prompt_tokens` when it
reports them (within the reservation, as always), else on that count; with a markup, on the
upstream's reported cost. The body goes upstream untouched but for `model` (the openai SDK asks
for `encoding_format: "base64"` by default: passed on as it is).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import openai_format
from ..catalog import Kind, ModelRoute
from ..openai_format import EmbeddingsRequest
from .clients import limit_payment_failures
from .paid import begin, serve_json

routes = web.RouteTableDef()


def _parse(body: dict[str, Any], route: ModelRoute, asked: str) -> EmbeddingsRequest:
    return openai_format.embeddings_request(body, asked, route.price, markup=route.markup_ratio)


@routes.post("/v1/embeddings")
@limit_payment_failures
async def embeddings(request: web.Request) -> web.StreamResponse:
    return await serve_json(
        await begin(request, Kind.EMBEDDINGS, _parse), lambda data: openai_format.reported_usage(data, output=False)
    )
