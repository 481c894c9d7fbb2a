"""`export: ["gguf"]` / `["gguf_q8_0"]` at job creation: accepted where llama.cpp's converter is
installed (`make` installs it), a 400 naming `export` where it is not, never a job that fails at
the end of its run. The missing converter is simulated by pointing its location at an empty
directory (the API process is this one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import BadRequestError

from tests.support.api import ProjectCtx
from tuneforge.training import gguf

MODEL = "tuneforge/tiny-chat"


@pytest.mark.parametrize("kind", ["gguf", "gguf_q8_0"])
def test_gguf_export_without_the_converter_is_a_400_naming_export(
    project: ProjectCtx, chat_jsonl: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf, "converter_dir", lambda: tmp_path / "no-converter")
    file_id = project.upload(chat_jsonl)
    with pytest.raises(BadRequestError) as refused:
        project.openai.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, extra_body={"export": ["merged", kind]}
        )
    assert refused.value.status_code == 400
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["param"] == "export" and body["code"] == "export_not_available"
    assert "install-converter" in body["message"]
    # the merged export alone needs nothing more
    job = project.openai.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, extra_body={"export": ["merged"]}
    )
    assert job.status == "validating_files"


@pytest.mark.skipif(bool(gguf.missing_requirements()), reason="the gguf extra (make installs it)")
def test_gguf_export_is_accepted_where_the_converter_is_installed(
    project: ProjectCtx, chat_jsonl: str
) -> None:
    file_id = project.upload(chat_jsonl)
    job = project.openai.fine_tuning.jobs.create(
        model=MODEL, training_file=file_id, extra_body={"export": ["gguf_q8_0"]}
    )
    assert job.status == "validating_files"
    fetched = project.client.get(f"/v1/fine_tuning/jobs/{job.id}", headers=project.headers).json()
    assert fetched["export"] == ["gguf_q8_0"]


def test_an_unknown_export_kind_is_a_400_naming_export(project: ProjectCtx, chat_jsonl: str) -> None:
    file_id = project.upload(chat_jsonl)
    with pytest.raises(BadRequestError) as refused:
        project.openai.fine_tuning.jobs.create(
            model=MODEL, training_file=file_id, extra_body={"export": ["ggml"]}
        )
    body = refused.value.body
    assert isinstance(body, dict) and str(body["param"]).startswith("export")
