"""`GET /metrics`: the scrape of store/metrics.py (the instruments live
there, beside the store and the runner that update them)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from store.metrics import scrape


async def _metrics(request: Request) -> Response:
    body, content_type = await scrape(request.app.state.store)
    return Response(body, media_type=content_type)


def install(app) -> None:
    """`GET /metrics`, beside /healthz: outside /v1 and without a key (what
    it tells is counts and timings, never a conversation, a principal or a
    key); keep it off the public network, or behind the proxy's auth."""
    app.add_api_route("/metrics", _metrics, methods=["GET"], tags=["health"], include_in_schema=True,
                      summary="Prometheus metrics", response_class=Response,
                      openapi_extra={"responses": {"200": {
                          "description": "The Prometheus text exposition format (version 0.0.4)",
                          "content": {"text/plain": {"schema": {"type": "string"}}}}}})
