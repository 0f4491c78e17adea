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
from ..states import StreamEnding
from .clients import limit_payment_failures
from .paid import answer_headers, begin, public_answer

routes = web.RouteTableDef()


def _parse(body: dict[str, Any], route: ModelRoute, asked: str) -> EmbeddingsRequest:
    return openai_format.embeddings_request(body, asked, route.price, markup=route.markup_ratio)


@routes.post("/v1/embeddings")
@limit_payment_failures
async def embeddings(request: web.Request) -> web.StreamResponse:
    call = await begin(request, Kind.EMBEDDINGS, _parse)
    charge = call.charge
    async with charge:
        answer = await call.upstream.post_json(
            call.request.endpoint, call.request.upstream_body(call.route.upstream_model)
        )
        await charge.committed()
        charge.finish(StreamEnding.DONE, openai_format.reported_usage(answer.data, output=False))
    headers = answer_headers(charge)
    return web.Response(
        body=public_answer(answer.data, answer.body, call), content_type="application/json", headers=headers
    )
