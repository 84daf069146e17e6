"""``/metrics``: Prometheus text format, read from Redis at each scrape (``diffq.app.api.metrics``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from diffq.app.api.metrics import DiffqCollector

router = APIRouter(tags=["metrics"])


def metrics_registry(collector: DiffqCollector) -> CollectorRegistry:
    """The app's own registry (never the global one, so several apps in one process do not clash):
    the deployment's figures from Redis, and this API process' own CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(namespace="diffq_api", registry=registry)
    return registry


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."}},
    summary="Prometheus metrics: queues, workers, job times, steps per second, images, failures",
)
def get_metrics(request: Request, accept: Annotated[str | None, Header()] = None) -> Response:
    # A plain `def`: the collector's Redis reads run in a worker thread, off the event loop.
    encoder, content_type = choose_encoder(accept or "")
    return Response(
        encoder(request.app.state.metrics_registry),
        media_type=None,
        headers={"Content-Type": content_type, "Cache-Control": "no-store"},
    )
