"""What is on file and how the service is: models, datasets, embedding status, health,
Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, PlainTextResponse

from medsim.access import Principal
from medsim.service import reads
from medsim.service.deps import Anyone, Operator, Searcher, ServiceDep, scope
from medsim.service.schemas import ERRORS, Me, ModelComparison

router = APIRouter(tags=["state"])


@router.get("/models")
def models(svc: ServiceDep, who: Searcher) -> list[dict]:
    """Registered models, the current one marked."""
    return [vars(m) for m in reads.models(svc, who)]


# it loads and runs every model, and shows every model's figures: an admin's token only
Comparer = Annotated[Principal, Depends(scope("admin", "comparing models"))]


@router.get("/models/compare", response_model=ModelComparison, responses={k: ERRORS[k] for k in (400, 404)})
def models_compare(svc: ServiceDep, who: Comparer,
                   model: Annotated[list[int] | None, Query(description="model ids (repeat; default: every model)")]
                   = None,
                   timing: Annotated[bool, Query(description="measure the embedding time per image (loads every "
                                                          "model)")] = True) -> ModelComparison:
    """Every model on file (or those named) by dataset: mAP@5, ACC@1, calibration ECE,
    embedding coverage, checkpoint size, input size, embedding time per image; what
    `medsim models compare` prints."""
    return ModelComparison(**reads.compare_models(svc, who, model, timing))


@router.get("/datasets")
def datasets(svc: ServiceDep, who: Searcher) -> list[dict]:
    """The datasets the user is granted, with their label names and images per split (the
    page's filters)."""
    return reads.datasets(svc, who)


@router.get("/status")
def status(svc: ServiceDep, who: Searcher) -> list[dict]:
    """Embedding progress per model and the user's datasets (the medsim.embedding_status view);
    `note` says in a sentence what is not embedded yet. `recent_check` is the model's
    calibration's latest `medsim calibration check` on recent images (null: never checked),
    and `calibration_note` says "not verified on recent images" where its coverage fell short."""
    return reads.status(svc, who)


@router.get("/me", response_model=Me)
def me(svc: ServiceDep, who: Searcher) -> Me:
    """Who the token is: its user, scope and the datasets it sees; `notice` is what the user
    must hear at sign-in (no dataset granted yet, and who can change that)."""
    return Me(**reads.me(svc, who))


@router.get("/healthz", responses={503: {"description": "not ready; the body says why"}})
def healthz(svc: ServiceDep, who: Anyone) -> JSONResponse:
    """200 when the database is reachable, the schema current and the current model
    loaded; 503 with the failing check otherwise. Without a token from this machine only."""
    ok, checks = reads.health(svc)
    return JSONResponse({"ok": ok, **checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(svc: ServiceDep, who: Operator) -> PlainTextResponse:
    """Prometheus text format: requests by route and status, latency per route and per
    search stage (decode, embed, search, fetch), pool usage. Without a token from this
    machine only; from elsewhere with an admin token."""
    st = svc.reader.get_stats()
    gauges = {"medsim_read_pool_size": st.get("pool_size", 0),
              "medsim_read_pool_available": st.get("pool_available", 0),
              "medsim_read_pool_waiting": st.get("requests_waiting", 0),
              "medsim_models_loaded": len(svc.nets), "medsim_faiss_indexes_loaded": len(svc.indexes)}
    return PlainTextResponse(svc.metrics.render(gauges), media_type="text/plain; version=0.0.4")
