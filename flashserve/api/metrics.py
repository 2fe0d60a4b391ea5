"""`GET /metrics`: the process's Prometheus registry (`flashserve/metrics.py`) in the text format, behind
the admin key. (The `metrics_bind` setting serves the same registry on an address of its own instead,
without a key, for a scraper on an internal network: `server.py`.)"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from flashserve import metrics
from flashserve.api.auth import require_admin_key

router = APIRouter(dependencies=[Depends(require_admin_key)])


@router.get("/metrics", include_in_schema=False)
async def get_metrics() -> Response:
    # In a thread: with --workers N, collecting scrapes every worker over HTTP.
    body = await asyncio.to_thread(metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
