"""The OpenAPI document declares every answer of every operation: a schema for each JSON body,
the error statuses in OpenAI's error shape, and no 422 (a bad request is a 400)."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.api import ADMIN_KEY, ProjectCtx, mark_validated

METHODS = {"get", "post", "put", "patch", "delete"}
ERROR_REF = "#/components/schemas/ErrorBody"
PUBLIC = {"/healthz", "/readyz", "/metrics"}


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def _schema_of(answer: dict[str, Any]) -> dict[str, Any] | None:
    content = answer.get("content", {})
    if not content:
        return None
    media = content.get("application/json") or next(iter(content.values()))
    schema: dict[str, Any] | None = media.get("schema")
    return schema


def test_every_operation_declares_its_answers(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = _operations(spec)
    assert len(operations) >= 27
    undeclared: list[str] = []
    for path, method, operation in operations:
        name = f"{method.upper()} {path}"
        answers = operation["responses"]
        if "422" in answers:
            undeclared.append(f"{name}: declares 422")
        successes = [code for code in answers if code.startswith(("2", "3"))]
        if not successes:
            undeclared.append(f"{name}: no success answer")
        for code in successes:
            schema = _schema_of(answers[code])
            if code.startswith("2") and (not schema or schema == {}):
                undeclared.append(f"{name}: {code} without a body schema")
        if path in PUBLIC:
            continue
        required = {"400", "401", "429", "503"} | ({"403"} if path.startswith("/v1/admin") else set())
        if "{" in path:
            required.add("404")
        if method != "get":
            required.add("413")
        for code in sorted(required):
            if code not in answers:
                undeclared.append(f"{name}: no {code}")
            elif (_schema_of(answers[code]) or {}).get("$ref") != ERROR_REF:
                undeclared.append(f"{name}: {code} is not the error shape")
    assert not undeclared, "\n".join(undeclared)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_upload_declares_413(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "413" in spec["paths"]["/v1/files"]["post"]["responses"]


class Conformance:
    """Checks real answers against the schema the document declares for their status."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.spec = client.get("/openapi.json").json()
        self.checked: set[str] = set()

    def __call__(self, method: str, template: str, path: str, key: str | None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = self.client.request(method, path, headers=headers, **kwargs)
        answer = self.spec["paths"][template][method.lower()]["responses"].get(str(response.status_code))
        assert answer is not None, f"{method} {template}: {response.status_code} is not declared"
        schema = _schema_of(answer)
        assert schema, f"{method} {template}: {response.status_code} has no schema"
        root = {"$ref": schema["$ref"], "components": self.spec["components"]} if "$ref" in schema else schema
        errors = [e.message for e in jsonschema_rs.Draft202012Validator(root).iter_errors(response.json())]
        assert not errors, f"{method} {template} {response.status_code}: {errors[:3]}\n{response.text[:2000]}"
        self.checked.add(f"{method} {template} {response.status_code}")
        return response.json()


def test_real_answers_conform_to_the_document(
    client: TestClient, app: FastAPI, project: ProjectCtx, chat_jsonl: str
) -> None:
    from tuneforge.db import session_scope
    from tuneforge.models.checkpoint import add_checkpoint, put_artifact

    check = Conformance(client)
    key = project.key
    files = "/v1/files"
    file = check(
        "POST", files, files, key, files={"file": ("a.jsonl", chat_jsonl)}, data={"purpose": "fine-tune"}
    )
    check("GET", files, files, key)
    check("GET", files + "/{file_id}", f"{files}/{file['id']}", key)
    check("GET", files + "/{file_id}", f"{files}/file-nothing", key)

    jobs = "/v1/fine_tuning/jobs"
    body = {"model": "tuneforge/tiny-chat", "training_file": file["id"], "metadata": {"k": "v"}}
    job = check("POST", jobs, jobs, key, json=body)
    check("POST", jobs, jobs, key, json={**body, "adapter": {"r": -1}})
    one = f"{jobs}/{job['id']}"
    with session_scope(app.state.sessionmaker) as session:
        add_checkpoint(session, job["id"], step_number=10, storage_key="x/10", metrics={"train_loss": 1.5})
        put_artifact(
            session,
            job["id"],
            name="adapter",
            storage_key="x/a",
            size=3,
            sha256="0" * 64,
            content_type="application/gzip",
        )
    check("GET", jobs, jobs, key, params={"limit": 1})
    check("GET", jobs + "/{fine_tuning_job_id}", one, key)
    check("GET", jobs + "/{fine_tuning_job_id}", one, None)
    check("GET", jobs + "/{fine_tuning_job_id}/events", one + "/events", key)
    check("GET", jobs + "/{fine_tuning_job_id}/checkpoints", one + "/checkpoints", key)
    check("GET", jobs + "/{fine_tuning_job_id}/artifacts", one + "/artifacts", key)
    mark_validated(app, job["id"])
    check("POST", jobs + "/{fine_tuning_job_id}/pause", one + "/pause", key)
    check("POST", jobs + "/{fine_tuning_job_id}/resume", one + "/resume", key)
    check("POST", jobs + "/{fine_tuning_job_id}/cancel", one + "/cancel", key)
    check("POST", jobs + "/{fine_tuning_job_id}/pause", one + "/pause", key)  # a refused change: 400

    check("GET", "/v1/models", "/v1/models", key)
    check("GET", "/v1/models/{model_id}", "/v1/models/tuneforge/tiny-chat", key)
    check(
        "POST",
        "/v1/fine_tuning/estimates",
        "/v1/fine_tuning/estimates",
        key,
        json={"model": "tuneforge/tiny-chat"},
    )
    graders = "/v1/fine_tuning/alpha/graders"
    exact = {
        "type": "string_check",
        "name": "g",
        "input": "{{sample.output_text}}",
        "reference": "a",
        "operation": "eq",
    }
    check("POST", graders + "/run", graders + "/run", key, json={"grader": exact, "model_sample": "a"})
    multi = {"type": "multi", "name": "m", "graders": {"g": exact}, "calculate_output": "g / 2"}
    check("POST", graders + "/run", graders + "/run", key, json={"grader": multi, "model_sample": "a"})
    check("POST", graders + "/run", graders + "/run", key, json={"grader": {"type": "python"}})
    check("POST", graders + "/validate", graders + "/validate", key, json={"grader": exact})
    check("DELETE", files + "/{file_id}", f"{files}/{file['id']}", key)

    projects = "/v1/admin/projects"
    check("GET", projects, projects, key)  # a project key: 403
    made = check("POST", projects, projects, ADMIN_KEY, json={"name": "conformance"})
    check("GET", projects, projects, ADMIN_KEY)
    check("GET", projects + "/{project_id}", f"{projects}/{made['id']}", ADMIN_KEY)
    api_key = check(
        "POST", projects + "/{project_id}/api_keys", f"{projects}/{made['id']}/api_keys", ADMIN_KEY
    )
    check("GET", projects + "/{project_id}/api_keys", f"{projects}/{made['id']}/api_keys", ADMIN_KEY)
    check(
        "DELETE",
        projects + "/{project_id}/api_keys/{key_id}",
        f"{projects}/{made['id']}/api_keys/{api_key['id']}",
        ADMIN_KEY,
    )
    check("GET", "/healthz", "/healthz", None)
    check("GET", "/readyz", "/readyz", None)
    statuses = {entry.rsplit(" ", 1)[1] for entry in check.checked}
    assert {"200", "400", "401", "403", "404"} <= statuses, check.checked
