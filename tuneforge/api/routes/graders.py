"""/v1/fine_tuning/alpha/graders: OpenAI's graders API, over tuneforge.graders."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.api.deps import ProjectDep, SettingsDep
from tuneforge.api.errors import BadRequest
from tuneforge.api.responses import GraderRunResult, GraderValidation, ok
from tuneforge.graders import Grader, GraderError, GraderRuntime, parse_grader, run_grader

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"])

GRADER_HELP = (
    "A grader: string_check, text_similarity, multi, python or score_model (label_model inside a "
    "multi grader), in OpenAI's shapes."
)


class GraderRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any] = Field(description=GRADER_HELP)
    model_sample: str = Field(description="The model's answer: `sample.output_text`, `sample.output_json`.")
    item: Any = Field(None, description="The dataset item: the `item` namespace of templates.")


class GraderValidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any] = Field(description=GRADER_HELP)


def _parse(data: dict[str, Any]) -> Grader:
    try:
        return parse_grader(data)
    except GraderError as exc:
        raise BadRequest(exc.message, param=exc.param, code="invalid_grader") from exc


@router.post("/run", summary="Run a grader on a model sample and an item", responses=ok(GraderRunResult))
def run(body: GraderRunRequest, caller: ProjectDep, settings: SettingsDep) -> JSONResponse:
    """`python` graders run only where the administrator enabled them, in a sandboxed process;
    model graders only with a configured chat endpoint; otherwise a 400 naming `grader.type`."""
    grader = _parse(body.grader)
    try:
        result = run_grader(grader, body.model_sample, body.item, GraderRuntime.from_settings(settings))
    except GraderError as exc:
        raise BadRequest(exc.message, param=exc.param, code="grader_unavailable") from exc
    return JSONResponse(result)


@router.post("/validate", summary="Validate a grader", responses=ok(GraderValidation))
def validate(body: GraderValidateRequest, caller: ProjectDep) -> JSONResponse:
    _parse(body.grader)
    return JSONResponse({"grader": body.grader})
