"""Operations routes: /health and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.state import StateDep

router = APIRouter()


@router.get("/health")
async def health(state: StateDep) -> JSONResponse:
    """200 once the model is loaded; 503 while loading, after a failed start, or while draining."""
    if state.draining:
        return JSONResponse({"status": "draining", "detail": "shutting down"}, status_code=503)
    if state.engine is None:
        return JSONResponse({"status": "error" if state.error else "loading", "detail": state.error},
                            status_code=503)
    workers = [{"pid": w.get("pid"), "device": w.get("device"), "ready": bool(w)}
               | ({"node_id": w["node_id"]} if "node_id" in w else {}) for w in state.engine.worker_info()]
    return JSONResponse({"status": "ok", "model": state.info.name if state.info else None,
                         "policy": state.settings.policy,
                         "max_batch_size": state.settings.running_cap(state.info.device if state.info else "cpu"),
                         "workers": workers, "pending": state.engine.pending})


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
