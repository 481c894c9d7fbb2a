"""POST /v1/fine_tuning/estimates: the fine-tuning cost calculator (tuneforge.estimates)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from tuneforge.api.deps import ProjectDep, SessionDep, SettingsDep
from tuneforge.api.errors import BadRequest, ServiceUnavailable
from tuneforge.estimates import EstimateError, EstimateRequest, EstimateResponse, FileStats, estimate
from tuneforge.estimates.skeleton import EstimateBusy
from tuneforge.models import file as files

router = APIRouter(prefix="/v1/fine_tuning", tags=["estimates"])


@router.post(
    "/estimates",
    response_model=EstimateResponse,
    summary="What a fine-tuning job would cost, and which method fits",
)
def create_estimate(
    body: EstimateRequest, caller: ProjectDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    """Runs in the thread pool: the first estimate for a model builds its meta skeleton (about a
    second for 8B); later ones are answered from the cache. Builds have a time budget, and only a
    few run at once per process: past that a 503 with Retry-After."""
    stats = None
    if body.training_file is not None:
        row = files.get_file(session, caller.project_id, body.training_file)
        if row is None:
            raise BadRequest(f"No such File object: {body.training_file}", param="training_file")
        stats = FileStats(examples=row.examples, approx_tokens=row.approx_tokens, format=row.format)
    try:
        result = estimate(body, file_stats=stats, settings=settings)
    except EstimateBusy as exc:
        busy = ServiceUnavailable(exc.message, code="estimates_busy")
        busy.headers = {"retry-after": str(exc.retry_after), "x-should-retry": "true"}
        raise busy from exc
    except EstimateError as exc:
        raise BadRequest(exc.message, param=exc.param) from exc
    return result.model_dump(mode="json")
