"""The OpenAPI document declares every answer of every operation: a schema for each JSON body,
the error statuses in OpenAI's error shape, and no 422 (a bad request is a 400)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

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
