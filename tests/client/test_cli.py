"""The `tuneforge` client commands against `make run` (`tuneforge migrate` + `tuneforge serve` with
its embedded worker): upload (through the Uploads API in parts; a bar at a terminal), create,
watch to success (exit 0) and of a failing job (exit 1), with its progress (a bar at a terminal,
lines elsewhere) showing the loss and ETA; download an adapter that PEFT loads and a merged model
that computes the same, and refuse bytes whose sha256 is not the listed one; `--json` parses
throughout; an error is one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, Server, start_server, stop_server
from tuneforge.cli import main
from tuneforge.storage.keys import artifact_key

pytestmark = pytest.mark.slow
state: dict[str, Any] = {}


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


def test_upload_create_watch_download(
    cli: Any, capsys: pytest.CaptureFixture[str], qa_path: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    # 5.5 KB in parts of 2,000 bytes: the Uploads API path, with lines split across parts
    status, file = cli("files", "upload", str(qa_path), "--chunked-threshold", "1000", "--part-size", "2000")
    assert status == 0
    assert file["id"].startswith("file-") and file["bytes"] == qa_path.stat().st_size

    status, job = cli(
        "jobs", "create", "--model", "tuneforge/tiny-chat", "--training-file", file["id"],
        "--max-steps", "2", "--batch-size", "8", "--suffix", "cli", "--metadata", "origin=cli",
        "--export", "merged",
    )  # fmt: skip
    assert status == 0
    assert job["status"] == "validating_files" and job["metadata"] == {"origin": "cli"}
    assert job["export"] == ["merged"]
    state["job"] = job["id"]

    # Without --json and with stderr no terminal (captured here): a line per new step or status,
    # with the loss once there is one, then the job's line on stdout.
    capsys.readouterr()
    assert main(["jobs", "watch", job["id"], "--interval", "0.5"]) == 0
    shown = capsys.readouterr()
    assert re.search(r"^succeeded  step 2/2  loss \d+\.\d{4}", shown.err, re.MULTILINE), shown.err
    assert shown.out.startswith(f"{job['id']}\tsucceeded\t"), shown.out
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

    # The merged export: a whole model that computes what the base with the adapter computes.
    merged_out = tmp_path / "merged"
    status, downloaded = cli("jobs", "download", job["id"], "--artifact", "merged", "-o", str(merged_out))
    assert status == 0
    assert {"config.json", "model.safetensors"} <= set(downloaded["files"]), downloaded["files"]
    import torch
    from transformers import AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(merged_out)
    ids = AutoTokenizer.from_pretrained(merged_out)("What is the capital of France?", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, model(**ids).logits, atol=1e-4, rtol=1e-4)


def test_download_with_a_wrong_sha256_fails_in_one_line(
    service: Server, cli: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The adapter's bytes changed in the store behind the service's back (one byte flipped, the
    size kept): the download is refused with one line, exit 1, and nothing is left unpacked."""
    job_id = state.get("job")
    if job_id is None:
        pytest.skip("the job of test_upload_create_watch_download was not created")
    stored = Path(service.env["TUNEFORGE_DATA_DIR"]) / "objects" / artifact_key(job_id, "adapter")
    original = stored.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    out = tmp_path / "tampered"
    try:
        stored.write_bytes(bytes(tampered))
        capsys.readouterr()
        status = main(["jobs", "download", job_id, "--artifact", "adapter", "-o", str(out)])
        captured = capsys.readouterr()
    finally:
        stored.write_bytes(original)
    assert status == 1
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    got = hashlib.sha256(bytes(tampered)).hexdigest()
    want = hashlib.sha256(original).hexdigest()
    assert lines[0] == f"tuneforge: error: sha256 mismatch: got {got}, the service lists {want}"
    assert list(out.iterdir()) == []  # neither the archive nor its files


def test_upload_draws_a_progress_bar_at_a_terminal(cli: Any, qa_path: Path) -> None:
    """At a terminal (a pty; `cli` sets the child's API environment), in parts."""
    command = [sys.executable, "-m", "tuneforge.cli", "files", "upload", str(qa_path)]
    uploader = Terminal([*command, "--chunked-threshold", "1000", "--part-size", "2000"])
    shown = uploader.wait(120)
    assert uploader.process.returncode == 0, shown
    size = qa_path.stat().st_size
    kib = f"{size / 1024:.2f}k"
    assert re.search(rf"upload {qa_path.name}: 100%\|.*\| {kib}/{kib} \[", shown), shown
    assert re.search(rf"^file-\S+\t{qa_path.name}\t{size} bytes", shown.replace("\r\n", "\n"), re.M), shown


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


def test_pause_resume_and_cancel_a_running_job(service: Server, cli: Any, qa_path: Path) -> None:
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

    def diagnosis() -> str:
        """What a timeout shows: the job, its events and the tail of each embedded process's log
        (the logs even when the API does not answer)."""
        lines = []
        try:
            events = cli("jobs", "events", job["id"], "--limit", "100")[1]["data"]
            lines.append(json.dumps(cli("jobs", "get", job["id"])[1]))
            lines += [f"{e['created_at']} {e['level']} {e['message']}" for e in reversed(events)]
        except Exception as error:  # a diagnosis must not hide the timeout
            lines.append(f"(the job and its events could not be read: {error!r})")
        return "\n".join([*lines, service.logs()])

    # `jobs watch` without --json, at a terminal (a pty): the whole run, until the cancel ends it.
    watcher = Terminal(
        [sys.executable, "-m", "tuneforge.cli", "jobs", "watch", job["id"], "--interval", "0.5"]
    )
    wait_for(lambda: step() >= 2, 300, "two trained steps", diagnosis)
    status, paused = cli("jobs", "pause", job["id"])
    assert status == 0 and paused["status"] in ("running", "paused"), paused
    wait_for(lambda: status_is("paused"), 120, "the pause", diagnosis)
    at = step()
    assert 2 <= at < 400
    status, resumed = cli("jobs", "resume", job["id"])
    assert status == 0 and resumed["status"] in ("queued", "running"), resumed
    wait_for(lambda: step() > at, 300, "training after the resume", diagnosis)
    status, cancelled = cli("jobs", "cancel", job["id"])
    assert status == 0 and cancelled["status"] in ("queued", "running", "cancelled"), cancelled
    status, watched = cli("jobs", "watch", job["id"], "--interval", "0.5")
    assert status == 1 and watched["status"] == "cancelled", watched

    shown = watcher.wait(120)
    assert watcher.process.returncode == 1, shown
    # tqdm's bar: steps out of the total, the last training loss and the API's ETA beside it
    assert re.search(r"\d+/400 \[", shown), shown
    assert re.search(r"loss=\d+\.\d{4}", shown), shown
    assert re.search(r"eta=\d+s", shown), shown
    assert f"Job paused at step {at}" in shown
    assert f"{job['id']}\tcancelled\t" in shown.replace("\r\n", "\n")  # the closing job line


class Terminal:
    """A child process whose stdout and stderr are a terminal (a pty 200 columns wide), read on a
    thread as it writes so that it never blocks on a full pty."""

    def __init__(self, args: list[str]) -> None:
        import fcntl
        import pty
        import struct
        import termios
        import threading

        master, child_end = pty.openpty()
        fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(
            args, env=dict(os.environ), cwd=REPO, stdin=subprocess.DEVNULL, stdout=child_end, stderr=child_end
        )
        os.close(child_end)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        try:
            while data := os.read(fd, 4096):
                self._chunks.append(data)
        except OSError:  # EIO: the child's end closed
            pass
        finally:
            os.close(fd)

    def wait(self, timeout: float) -> str:
        """Everything it wrote, once it has exited (killed after `timeout` seconds)."""
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(10)
        return b"".join(self._chunks).decode(errors="replace")
