"""Files through the official SDK: upload, list, retrieve, download byte for byte, delete."""

from __future__ import annotations

import json

import openai
import pytest

from tests.api.conftest import ProjectCtx


def test_upload_retrieve_download_delete(project: ProjectCtx, chat_jsonl: str) -> None:
    created = project.openai.files.create(file=("qa.jsonl", chat_jsonl.encode()), purpose="fine-tune")
    assert created.id.startswith("file-")
    assert created.object == "file"
    assert created.bytes == len(chat_jsonl.encode())
    assert created.filename == "qa.jsonl"
    assert created.purpose == "fine-tune"
    assert isinstance(created.created_at, int)

    assert project.openai.files.retrieve(created.id).id == created.id
    assert project.openai.files.content(created.id).content == chat_jsonl.encode()

    deleted = project.openai.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        project.openai.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        project.openai.files.content(created.id)


def test_upload_records_format_and_counts(project: ProjectCtx, app: object, chat_jsonl: str) -> None:
    from tuneforge.models.file import File

    file_id = project.upload(chat_jsonl)
    with app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        row = session.get(File, file_id)
        assert row is not None
        assert row.format == "chat"
        assert row.examples == 32
        assert row.approx_tokens and row.approx_tokens > 0
        assert app.state.store.get_bytes(row.storage_key) == chat_jsonl.encode()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("line", "fmt"),
    [
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference"),
        ({"text": "raw text"}, "text"),
    ],
)
def test_every_format_is_accepted(
    project: ProjectCtx, app: object, line: dict[str, object], fmt: str
) -> None:
    from tuneforge.models.file import File

    file_id = project.upload(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    with app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        row = session.get(File, file_id)
        assert row is not None and row.format == fmt and row.examples == 2


def test_list_pages_newest_first(project: ProjectCtx, chat_jsonl: str) -> None:
    ids = [project.upload(chat_jsonl, f"f{i}.jsonl") for i in range(5)]
    page = project.client.get("/v1/files", params={"limit": 2}, headers=project.headers).json()
    assert page["object"] == "list"
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    seen = [f.id for f in project.openai.files.list(limit=2)]  # the SDK pages with `after`
    assert seen == ids[::-1]
    ascending = project.client.get("/v1/files", params={"order": "asc"}, headers=project.headers).json()
    assert [f["id"] for f in ascending["data"]] == ids


def test_files_are_scoped_to_the_project(
    project: ProjectCtx, other_project: ProjectCtx, chat_jsonl: str
) -> None:
    file_id = project.upload(chat_jsonl)
    assert [f.id for f in other_project.openai.files.list()] == []
    with pytest.raises(openai.NotFoundError):
        other_project.openai.files.retrieve(file_id)
    with pytest.raises(openai.NotFoundError):
        other_project.openai.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        other_project.openai.files.delete(file_id)
    assert project.openai.files.retrieve(file_id).id == file_id


def test_fields_after_the_file_part_are_read(project: ProjectCtx, chat_jsonl: str) -> None:
    boundary = "xyzBOUNDARYxyz"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="late.jsonl"\r\n'
        f"Content-Type: application/jsonl\r\n\r\n{chat_jsonl}\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    response = project.client.post(
        "/v1/files",
        content=body,
        headers={**project.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "late.jsonl"
    assert response.json()["bytes"] == len(chat_jsonl.encode())
