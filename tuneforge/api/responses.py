"""What the API answers, declared for the OpenAPI document: a pydantic model per JSON body and
the error statuses each operation can answer.

Routes keep returning `Response` objects built from plain dicts (cheap; see api/schemas.py), and
name their bodies here through `responses={200: {"model": X}}` in their decorators, so the spec is
complete without FastAPI validating and re-serializing each answer. `install_openapi` adds the
error statuses every authenticated operation shares and removes FastAPI's 422, which this API
never answers (a bad request is a 400)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: ErrorDetail


Answers = dict[int | str, dict[str, Any]]


def _error(code: int, description: str) -> Answers:
    return {code: {"model": ErrorBody, "description": description}}


BAD_REQUEST = _error(400, "The request is invalid; `param` names the field by its dotted path.")
UNAUTHORIZED = _error(401, "No API key, or an unknown or revoked one.")
FORBIDDEN = _error(403, "The key may not call this operation (admin routes need the admin key).")
NOT_FOUND = _error(404, "No such object in the caller's project.")
TOO_LARGE = _error(413, "The request body (a JSON body, an upload) is over its size limit.")
RATE_LIMITED = _error(429, "Over a quota or a rate limit of the project; retry later.")
UNAVAILABLE = _error(
    503, "A service the API depends on (the database) is unavailable; retry (x-should-retry: true)."
)

BODY_METHODS = frozenset({"post", "put", "patch", "delete"})

# Every operation behind a key can answer these.
AUTHENTICATED: Answers = {**BAD_REQUEST, **UNAUTHORIZED, **RATE_LIMITED, **UNAVAILABLE}
ADMIN: Answers = {**AUTHENTICATED, **FORBIDDEN}


def ok(model: type[BaseModel], description: str = "Success.") -> Answers:
    return {200: {"model": model, "description": description}}


def download(*media_types: str, redirect: bool = False) -> Answers:
    """A 200 of raw bytes (and, with `redirect`, a 307 to a presigned URL)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    answers: Answers = {
        200: {"description": "The bytes.", "content": {media_type: binary for media_type in media_types}}
    }
    if redirect:
        answers[307] = {"description": "A redirect to a presigned URL of the object store (`redirect=true`)."}
    return answers


class _Open(BaseModel):
    """Objects may gain fields; clients must ignore those they do not know."""

    model_config = ConfigDict(extra="allow")


class ListPage(_Open):
    object: Literal["list"]
    has_more: bool


class FileObject(_Open):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: str
    status: str
    status_details: str | None


class FileList(ListPage):
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None


class Deleted(_Open):
    id: str
    object: str
    deleted: Literal[True]


class JobProgress(_Open):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None


class Upload(_Open):
    id: str = Field(description="upload_...")
    object: Literal["upload"]
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: str = Field(description="pending, completed, cancelled or expired.")
    file: FileObject | None = Field(None, description="The file the upload became, once completed.")


class UploadPart(_Open):
    id: str = Field(description="part_...")
    object: Literal["upload.part"]
    created_at: int
    upload_id: str


class FineTuningJob(_Open):
    id: str = Field(description="ftjob-...")
    object: Literal["fine_tuning.job"]
    created_at: int
    finished_at: int | None
    estimated_finish: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str = Field(description="The project's id.")
    status: str = Field(
        description="validating_files, queued, running, paused, succeeded, failed or cancelled."
    )
    error: dict[str, Any] | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    seed: int | None
    suffix: str | None
    integrations: list[dict[str, Any]]
    metadata: dict[str, str] | None
    adapter: dict[str, Any] | None
    export: list[str]
    hardware: dict[str, Any] | None = Field(
        None, description='Devices per run as asked: {"count": N, "strategy": "auto"|"ddp"|"fsdp"}, or null.'
    )
    progress: JobProgress | None
    trainable_params: int | None
    total_params: int | None
    estimate: dict[str, Any] | None
    base_model: str | None = Field(None, description="The original base model id (lineage).")
    parent: dict[str, str | None] | None = Field(
        None, description='A continued job\'s parent: {"job": "ftjob-...", "checkpoint": "ftckpt-..."|null}.'
    )


class FineTuningJobList(ListPage):
    data: list[FineTuningJob]


class FineTuningJobEvent(_Open):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: str
    message: str
    type: str | None
    data: dict[str, Any] | None


class FineTuningJobEventList(ListPage):
    data: list[FineTuningJobEvent]


class FineTuningJobCheckpoint(_Open):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class FineTuningJobCheckpointList(ListPage):
    data: list[FineTuningJobCheckpoint]
    first_id: str | None = None
    last_id: str | None = None


class Artifact(_Open):
    name: str
    bytes: int
    sha256: str | None
    content_type: str
    created_at: int


class ArtifactList(ListPage):
    data: list[Artifact]


class Model(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[Model]


class Project(_Open):
    id: str
    object: Literal["organization.project"]
    name: str
    created_at: int


class ProjectList(ListPage):
    data: list[Project]


class ApiKey(_Open):
    id: str
    object: Literal["organization.project.api_key"]
    project_id: str
    redacted_value: str
    created_at: int
    revoked_at: int | None
    value: str | None = Field(None, description="The key itself: only in the answer that creates it.")


class ApiKeyList(ListPage):
    data: list[ApiKey]


class ApiKeyDeleted(ApiKey):
    deleted: Literal[True]


class GraderRunErrors(_Open):
    formula_parse_error: bool
    invalid_variable_error: bool
    model_grader_parse_error: bool
    model_grader_refusal_error: bool
    model_grader_server_error: bool
    model_grader_server_error_details: str | None
    other_error: bool
    python_grader_runtime_error: bool
    python_grader_runtime_error_details: str | None
    python_grader_server_error: bool
    python_grader_server_error_type: str | None
    sample_parse_error: bool
    truncated_observation_error: bool
    unresponsive_reward_error: bool


class GraderRunMetadata(_Open):
    errors: GraderRunErrors
    execution_time: float = Field(description="Seconds the grader ran.")
    name: str
    type: str
    scores: dict[str, Any] = Field(description="A multi grader's sub-graders' rewards by name.")
    sampled_model_name: str | None
    token_usage: int | None


class GraderRunResult(_Open):
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]


class GraderValidation(_Open):
    grader: dict[str, Any] = Field(description="The grader, as given.")


def install_openapi(app: FastAPI) -> None:
    """The app's OpenAPI document, built once: as FastAPI makes it, minus the 422 answers and
    their schemas, plus the 413 any operation that takes a body can answer (a JSON body over the
    size limit is refused before routing)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            too_large = {
                "description": TOO_LARGE[413]["description"],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
            for path in spec.get("paths", {}).values():
                for method, operation in path.items():
                    answers = operation.get("responses", {})
                    answers.pop("422", None)
                    if method in BODY_METHODS:
                        answers.setdefault("413", too_large)
            schemas = spec.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
