"""Bad inputs: each a 4xx with OpenAI's error body, naming the field
or line, and nothing half-written (no job, no file row, no stored object)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from tests.api.conftest import ADMIN_KEY, ProjectCtx
from tuneforge.models.file import File
from tuneforge.models.job import Job

MODEL = "tuneforge/tiny-chat"


def _counts(app: FastAPI) -> tuple[int, int, int]:
    with app.state.sessionmaker() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
        files = session.scalar(select(func.count()).select_from(File))
    objects = len(list(app.state.store.list("files/")))
    return int(jobs or 0), int(files or 0), objects


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


def _job(project: ProjectCtx, training_file: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "training_file": training_file, **extra}
    return project.client.post("/v1/fine_tuning/jobs", json=body, headers=project.headers)


def _upload(project: ProjectCtx, content: bytes, **headers: str) -> httpx.Response:
    return project.client.post(
        "/v1/files",
        files={"file": ("bad.jsonl", content)},
        data={"purpose": "fine-tune"},
        headers={**project.headers, **headers},
    )


def test_every_bad_input_is_refused_cleanly(
    project: ProjectCtx, other_project: ProjectCtx, app: FastAPI, chat_jsonl: str, dpo_jsonl: str
) -> None:
    chat_file = project.upload(chat_jsonl)
    other_file = other_project.upload(chat_jsonl)
    other_job = other_project.openai.fine_tuning.jobs.create(model=MODEL, training_file=other_file).id
    before = _counts(app)

    # Upload: malformed JSON on line N names N.
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    err = _error(_upload(project, f"{good}\n{good}\n{{not json\n{good}\n".encode()), 400)
    assert "line 3" in err["message"] and err["param"] == "file" and err["code"] == "invalid_file_format"

    # Upload: a file in no known format.
    err = _error(_upload(project, b'{"question": "q", "answer": "a"}\n'), 400)
    assert "line 1" in err["message"] and "no known format" in err["message"]

    # Upload: lines in different formats.
    mixed = f'{good}\n{{"text": "raw"}}\n'.encode()
    assert "line 2" in _error(_upload(project, mixed), 400)["message"]

    # Upload: empty file, wrong purpose, no file part.
    assert _error(_upload(project, b""), 400)["param"] == "file"
    wrong_purpose = project.client.post(
        "/v1/files",
        files={"file": ("x.jsonl", chat_jsonl.encode())},
        data={"purpose": "assistants"},
        headers=project.headers,
    )
    assert _error(wrong_purpose, 400)["param"] == "purpose"
    no_file = project.client.post("/v1/files", data={"purpose": "fine-tune"}, headers=project.headers)
    assert _error(no_file, 400)["param"] == "file"

    # Upload over the limit (this app's limit is 1 MiB): 413, by Content-Length and while streaming.
    big = (good + "\n").encode() * ((2 << 20) // len(good))
    err = _error(_upload(project, big), 413)
    assert err["param"] == "file"

    def chunked() -> Any:
        for _ in range(40):
            yield (good + "\n").encode() * 1000

    boundary = "b0undary"

    def body() -> Any:
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'.encode()
        disposition = 'Content-Disposition: form-data; name="file"; filename="x.jsonl"'
        yield f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
        yield from chunked()
        yield f"\r\n--{boundary}--\r\n".encode()

    streamed = project.client.post(
        "/v1/files",
        content=body(),
        headers={**project.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    _error(streamed, 413)

    # Jobs: a DPO job on a chat SFT file.
    err = _error(_job(project, chat_file, method={"type": "dpo"}), 400)
    assert err["param"] == "training_file" and "chat" in err["message"] and "preference" in err["message"]
    # ... and a supervised job on a DPO file.
    assert _counts(app) == before, "a refused upload left something behind"
    dpo_file = project.upload(dpo_jsonl)
    before = _counts(app)
    assert _error(_job(project, dpo_file), 400)["param"] == "training_file"

    # An unknown model.
    err = _error(_job(project, chat_file, model="no-such/model"), 400)
    assert err["param"] == "model" and "no-such/model" in err["message"]

    # n_epochs 0 or 51; batch_size "big".
    for value in (0, 51):
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": value}}}
        err = _error(_job(project, chat_file, method=method), 400)
        assert err["param"] == "method.supervised.hyperparameters.n_epochs"
    method = {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "big"}}}
    assert _error(_job(project, chat_file, method=method), 400)["param"] == (
        "method.supervised.hyperparameters.batch_size"
    )
    # DPO beta out of range.
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}
    assert _error(_job(project, dpo_file, method=method), 400)["param"] == "method.dpo.hyperparameters.beta"

    # A 65-character suffix; 17 metadata pairs; a too-long metadata value.
    assert _error(_job(project, chat_file, suffix="s" * 65), 400)["param"] == "suffix"
    metadata = {f"k{i}": "v" for i in range(17)}
    assert _error(_job(project, chat_file, metadata=metadata), 400)["param"] == "metadata"
    assert _error(_job(project, chat_file, metadata={"k": "v" * 513}), 400)["param"] == "metadata.k"

    # A reinforcement job without its grader.
    err = _error(_job(project, chat_file, method={"type": "reinforcement"}), 400)
    assert err["param"] == "method.reinforcement.grader" and "grader" in err["message"]

    # A bad adapter, an unknown field, a missing field, malformed JSON.
    err = _error(_job(project, chat_file, adapter={"type": "lora", "r": 0}), 400)
    assert err["param"] == "adapter.r"
    assert _error(_job(project, chat_file, adapter={"type": "magic"}), 400)["param"] == "adapter.type"
    assert _error(_job(project, chat_file, bogus=1), 400)["param"] == "bogus"
    missing = project.client.post("/v1/fine_tuning/jobs", json={"model": MODEL}, headers=project.headers)
    assert _error(missing, 400)["param"] == "training_file"
    malformed = project.client.post(
        "/v1/fine_tuning/jobs",
        content=b'{"model": ',
        headers={**project.headers, "Content-Type": "application/json"},
    )
    _error(malformed, 400)

    # Files that do not exist, or belong to another project.
    err = _error(_job(project, "file-doesnotexist"), 400)
    assert err["param"] == "training_file" and "not found" in err["message"]
    err = _error(_job(project, other_file), 400)
    assert err["param"] == "training_file" and "not found" in err["message"]
    err = _error(_job(project, chat_file, validation_file=other_file), 400)
    assert err["param"] == "validation_file"

    # Another project's file or job: 404.
    for path in (f"/v1/files/{other_file}", f"/v1/files/{other_file}/content"):
        _error(project.client.get(path, headers=project.headers), 404)
    _error(project.client.delete(f"/v1/files/{other_file}", headers=project.headers), 404)
    for path in ("", "/events", "/checkpoints", "/artifacts"):
        _error(project.client.get(f"/v1/fine_tuning/jobs/{other_job}{path}", headers=project.headers), 404)
    for action in ("cancel", "pause", "resume"):
        response = project.client.post(f"/v1/fine_tuning/jobs/{other_job}/{action}", headers=project.headers)
        _error(response, 404)

    # Bad paging parameters.
    assert (
        _error(project.client.get("/v1/fine_tuning/jobs?limit=0", headers=project.headers), 400)["param"]
        == "limit"
    )
    assert (
        _error(project.client.get("/v1/fine_tuning/jobs?after=ftjob-nope", headers=project.headers), 400)[
            "param"
        ]
        == "after"
    )

    # A missing or wrong key: 401.
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        for method_name, path in (
            ("GET", "/v1/files"),
            ("POST", "/v1/fine_tuning/jobs"),
            ("GET", "/v1/models"),
        ):
            response = project.client.request(method_name, path, headers=headers, json={})
            assert _error(response, 401)["code"] == "invalid_api_key"

    assert _counts(app) == before, "a refused request left something behind"
    # The other project's job is untouched by all of the above.
    assert other_project.openai.fine_tuning.jobs.retrieve(other_job).status == "validating_files"


@pytest.mark.parametrize("status_code", [400])
def test_refused_state_change_is_never_409(project: ProjectCtx, chat_jsonl: str, status_code: int) -> None:
    job = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=project.upload(chat_jsonl))
    project.openai.fine_tuning.jobs.cancel(job.id)
    response = project.client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel", headers=project.headers)
    assert response.status_code == status_code
    assert response.headers["x-should-retry"] == "false"


def test_nul_is_refused_in_every_field_and_id(
    project: ProjectCtx, app: FastAPI, client: object, chat_jsonl: str
) -> None:
    """PostgreSQL cannot hold NUL: it is a 400 naming the field, in bodies, ids and query
    parameters alike, and nothing is stored; the project's metadata filters keep working."""
    file_id = project.upload(chat_jsonl)
    job_id = project.openai.fine_tuning.jobs.create(model=MODEL, training_file=file_id).id
    before = _counts(app)
    jobs = project.openai.fine_tuning.jobs

    refused_bodies: list[tuple[dict[str, Any], str]] = [
        ({"metadata": {"k": "a\x00b"}}, "metadata.k"),
        ({"metadata": {"k\x00": "v"}}, "metadata"),
        ({"suffix": "s\x00"}, "suffix"),
        ({"training_file": "file-\x00"}, "training_file"),
        (
            {"integrations": [{"type": "wandb", "wandb": {"project": "p\x00"}}]},
            "integrations[0].wandb.project",
        ),
    ]
    for extra, param in refused_bodies:
        body: dict[str, Any] = {"model": MODEL, "training_file": file_id, **extra}
        with pytest.raises(openai.BadRequestError) as refused:
            jobs.create(**body)
        assert refused.value.param == param, (extra, refused.value.body)
        assert "NUL" in refused.value.message

    refused_urls = [
        ("GET", "/v1/files/file-%00", "file_id"),
        ("GET", "/v1/files/file-%00/content", "file_id"),
        ("DELETE", "/v1/files/file-%00", "file_id"),
        ("GET", "/v1/files?purpose=fine-tune%00", "purpose"),
        ("GET", "/v1/files?after=file-%00", "after"),
        ("GET", "/v1/fine_tuning/jobs/ftjob-%00", "fine_tuning_job_id"),
        ("POST", "/v1/fine_tuning/jobs/ftjob-%00/cancel", "fine_tuning_job_id"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events?after=ftevent-%00", "after"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints?after=%00", "after"),
        ("GET", "/v1/fine_tuning/jobs?after=%00", "after"),
        ("GET", "/v1/fine_tuning/jobs?metadata%5Bk%5D=%00", "metadata[k]"),
        ("GET", "/v1/fine_tuning/jobs?metadata%5Bk%00%5D=v", "metadata[k\\u0000]"),
    ]
    for method, url, param in refused_urls:
        err = _error(project.client.request(method, url, headers=project.headers), 400)
        assert err["param"] == param, (url, err)

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    named = project.client.post("/v1/admin/projects", json={"name": "team\x00"}, headers=admin)
    assert _error(named, 400)["param"] == "name"
    # A body sent without a Content-Type is read as JSON all the same.
    untyped = json.dumps({"model": MODEL, "training_file": file_id, "suffix": "\x00"}).encode()
    response = project.client.post("/v1/fine_tuning/jobs", content=untyped, headers=project.headers)
    assert _error(response, 400)["param"] == "suffix"
    # A JSON body too large to be a request is refused before it is held.
    huge = json.dumps({"model": MODEL, "training_file": file_id, "suffix": "s" * (17 << 20)})
    response = project.client.post(
        "/v1/fine_tuning/jobs", content=huge, headers={**project.headers, "Content-Type": "application/json"}
    )
    assert _error(response, 413)["code"] == "request_too_large"
    assert _counts(app) == before, "a refused request left something behind"

    # A backslash followed by "u0000" is text, not NUL: stored and found by a metadata filter.
    literal = jobs.create(model=MODEL, training_file=file_id, metadata={"k": "\\u0000"})
    assert jobs.retrieve(literal.id).metadata == {"k": "\\u0000"}
    found = project.client.get(
        "/v1/fine_tuning/jobs", params={"metadata[k]": "\\u0000"}, headers=project.headers
    )
    assert found.status_code == 200, found.text
    assert [j["id"] for j in found.json()["data"]] == [literal.id]


def test_metadata_filter_keys_with_json_path_characters(project: ProjectCtx, chat_jsonl: str) -> None:
    """Keys that JSON paths treat as syntax filter like any other key, on both backends."""
    file_id = project.upload(chat_jsonl)
    jobs = project.openai.fine_tuning.jobs
    plain = jobs.create(model=MODEL, training_file=file_id, metadata={"x": "1", "a.b": "1", "c[0]": "2"})
    quoted = jobs.create(model=MODEL, training_file=file_id, metadata={'x"]': "1", 'x"': "3"})
    for key, value, expected in (
        ("x", "1", [plain.id]),
        ("a.b", "1", [plain.id]),
        ("c[0]", "2", [plain.id]),
        ('x"]', "1", [quoted.id]),
        ('x"', "3", [quoted.id]),
        ('x"b', "1", []),
        ("x\\", "1", []),
        ("$", "1", []),
    ):
        response = project.client.get(
            "/v1/fine_tuning/jobs", params={f"metadata[{key}]": value}, headers=project.headers
        )
        assert response.status_code == 200, (key, response.text)
        assert [j["id"] for j in response.json()["data"]] == expected, key


def test_jsonl_beyond_the_parsers_limits_names_the_line(project: ProjectCtx, app: FastAPI) -> None:
    good = json.dumps({"text": "fine"})
    before = _counts(app)
    deep = '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge_int = '{"text": "a", "n": ' + "7" * 5000 + "}"
    for line, reason in ((deep, "nested too deeply"), (huge_int, "digits")):
        with pytest.raises(openai.BadRequestError) as refused:
            project.openai.files.create(file=("x.jsonl", f"{good}\n{line}\n".encode()), purpose="fine-tune")
        assert refused.value.param == "file"
        assert "line 2" in refused.value.message and reason in refused.value.message
    assert _counts(app) == before


def test_integrations_are_bounded(project: ProjectCtx, app: FastAPI, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    before = _counts(app)
    many = [{"type": "tensorboard"} for _ in range(9)]
    big = [{"type": "wandb", "wandb": {"project": "p", "tags": ["t" * 65]}}]
    extra = [{"type": "mlflow", "mlflow": {"tracking_uri": "file:///etc"}}]
    for integrations, param in (
        (many, "integrations"),
        (big, "integrations[0].wandb.tags[0]"),
        (extra, "integrations[0].mlflow.tracking_uri"),
    ):
        err = _error(_job(project, file_id, integrations=integrations), 400)
        assert err["param"] == param, err
    assert _counts(app) == before
    fine = [{"type": "tensorboard"}]
    assert _job(project, file_id, integrations=fine).status_code == 200


def test_nul_in_any_declared_parameter_or_body_is_a_400(project: ProjectCtx, app: FastAPI) -> None:
    """Every operation of the OpenAPI spec, with a NUL in each path parameter, each query
    parameter and its JSON body: a 400 naming the parameter, before any route runs."""
    checked = 0
    for template, operations in app.openapi()["paths"].items():
        names = re.findall(r"{(\w+)}", template)
        for method, operation in operations.items():
            plain = re.sub(r"{\w+}", "x", template)
            for name in names:
                url = re.sub(
                    r"{\w+}", lambda m, name=name: "x%00" if m.group(0) == f"{{{name}}}" else "x", template
                )
                response = project.client.request(method.upper(), url, headers=project.headers)
                assert _error(response, 400)["param"] == name, (method, url)
                checked += 1
            for parameter in operation.get("parameters", []):
                if parameter["in"] != "query":
                    continue
                response = project.client.request(
                    method.upper(), plain, params={parameter["name"]: "a\x00"}, headers=project.headers
                )
                assert _error(response, 400)["param"] == parameter["name"], (method, plain)
                checked += 1
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                response = project.client.request(
                    method.upper(), plain, json={"name": "a\x00", "model": "m"}, headers=project.headers
                )
                assert _error(response, 400)["param"] == "name", (method, plain)
                checked += 1
    assert checked >= 25
