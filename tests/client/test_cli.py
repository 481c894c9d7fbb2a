"""The `tuneforge` client commands against `make run` (`tuneforge migrate` + `tuneforge serve` with
its embedded worker): upload (through the Uploads API in parts), create, watch to success (exit 0)
and of a failing job (exit 1), download an adapter that PEFT loads; `--json` parses throughout;
an error is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, Server, start_server, stop_server
from tuneforge.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_chat_path: Path) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("cli-service")
    server = start_server({}, data_dir)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def cli(service: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Runs `tuneforge ARGS --json` in this process; returns (exit status, parsed stdout)."""
    key = (Path(service.env["TUNEFORGE_DATA_DIR"]) / "admin_key").read_text().strip()
    monkeypatch.setenv("TUNEFORGE_API_URL", service.base_url + "/v1")
    monkeypatch.setenv("TUNEFORGE_API_KEY", key)

    def run(*args: str) -> tuple[int, Any]:
        capsys.readouterr()
        status = main([*args, "--json"])
        out = capsys.readouterr().out
        return status, json.loads(out) if out.strip() else None

    return run


def test_upload_create_watch_download(cli: Any, qa_path: Path, tiny_chat_path: Path, tmp_path: Path) -> None:
    # 5.5 KB in parts of 2,000 bytes: the Uploads API path, with lines split across parts
    status, file = cli("files", "upload", str(qa_path), "--chunked-threshold", "1000", "--part-size", "2000")
    assert status == 0
    assert file["id"].startswith("file-") and file["bytes"] == qa_path.stat().st_size

    status, job = cli(
        "jobs", "create", "--model", "tuneforge/tiny-chat", "--training-file", file["id"],
        "--max-steps", "2", "--batch-size", "8", "--suffix", "cli", "--metadata", "origin=cli",
    )  # fmt: skip
    assert status == 0
    assert job["status"] == "validating_files" and job["metadata"] == {"origin": "cli"}

    status, watched = cli("jobs", "watch", job["id"], "--interval", "0.5")
    assert status == 0, watched
    assert watched["status"] == "succeeded"

    status, listed = cli("jobs", "list", "--limit", "5")
    assert status == 0 and job["id"] in [j["id"] for j in listed["data"]]
    status, events = cli("jobs", "events", job["id"], "--limit", "100")
    assert status == 0 and any(e["type"] == "metrics" for e in events["data"])
    assert cli("jobs", "get", job["id"])[1]["fine_tuned_model"] == watched["fine_tuned_model"]

    out = tmp_path / "adapter"
    status, downloaded = cli("jobs", "download", job["id"], "--artifact", "adapter", "-o", str(out))
    assert status == 0
    assert "adapter_config.json" in downloaded["files"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_path), out)
    assert model.peft_config["default"].peft_type.value == "LORA"


def test_watch_of_a_failing_job_exits_non_zero(cli: Any, qa_path: Path) -> None:
    status, file = cli("files", "upload", str(qa_path))
    assert status == 0
    status, job = cli("jobs", "create", "--model", "tuneforge/tiny-chat", "--training-file", file["id"])
    assert status == 0
    # Its training file gone before a worker validates it: the job fails in validation.
    import httpx

    key = os.environ["TUNEFORGE_API_KEY"]
    url = os.environ["TUNEFORGE_API_URL"]
    assert (
        httpx.delete(f"{url}/files/{file['id']}", headers={"Authorization": f"Bearer {key}"}).status_code
        == 200
    )
    status, watched = cli("jobs", "watch", job["id"], "--interval", "0.5")
    assert status == 1
    assert watched["status"] == "failed", watched


def test_errors_are_one_line(service: Server, tmp_path: Path) -> None:
    env = {**service.env, "TUNEFORGE_API_URL": service.base_url + "/v1", "TUNEFORGE_API_KEY": "tf-wrong"}
    answer = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", "jobs", "get", "ftjob-nope"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 1
    assert answer.stdout == ""
    lines = answer.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuneforge: error: 401: "), answer.stderr


def test_pause_resume_and_cancel_a_running_job(cli: Any, qa_path: Path) -> None:
    """`jobs pause` stops a running job at a checkpoint, `jobs resume` sends it back to run from
    there, `jobs cancel` ends it; `watch` of the cancelled job exits non-zero."""
    from tests.support import wait_for

    status, file = cli("files", "upload", str(qa_path))
    assert status == 0
    status, job = cli(
        "jobs", "create", "--model", "tuneforge/tiny-chat", "--training-file", file["id"],
        "--max-steps", "400",
    )  # fmt: skip
    assert status == 0

    def step() -> int:
        return int((cli("jobs", "get", job["id"])[1].get("progress") or {}).get("step") or 0)

    def status_is(*wanted: str) -> bool:
        return cli("jobs", "get", job["id"])[1]["status"] in wanted

    wait_for(lambda: step() >= 2, 300, "two trained steps")
    status, paused = cli("jobs", "pause", job["id"])
    assert status == 0 and paused["status"] in ("running", "paused"), paused
    wait_for(lambda: status_is("paused"), 120, "the pause")
    at = step()
    assert 2 <= at < 400
    status, resumed = cli("jobs", "resume", job["id"])
    assert status == 0 and resumed["status"] in ("queued", "running"), resumed
    wait_for(lambda: step() > at, 300, "training after the resume")
    status, cancelled = cli("jobs", "cancel", job["id"])
    assert status == 0 and cancelled["status"] in ("queued", "running", "cancelled"), cancelled
    status, watched = cli("jobs", "watch", job["id"], "--interval", "0.5")
    assert status == 1 and watched["status"] == "cancelled", watched
