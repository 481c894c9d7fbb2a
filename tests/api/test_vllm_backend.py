"""The vLLM backend (`TUNEFORGE_INFERENCE_URL`) through the SDK, against `VllmStub`: a stand-in
for a vLLM server, because vLLM needs a GPU and none runs here. The stub implements the documented
vLLM endpoints the API uses (`POST /v1/load_lora_adapter`, `GET /v1/models`, `POST
/v1/chat/completions`, `POST /v1/completions`) with vLLM's behaviour where the API depends on it: a
model name it has not loaded is a 404, loading a name twice is a 400 "already been loaded", and a
restart forgets every runtime-loaded adapter. It answers with canned text, not a model."""

from __future__ import annotations

import json
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support import free_port
from tests.support.api import ProjectCtx, new_project
from tests.support.chat_stub import send_json
from tuneforge.config import Settings
from tuneforge.db import session_scope
from tuneforge.models.checkpoint import add_checkpoint, put_artifact
from tuneforge.models.job import Job
from tuneforge.storage.keys import CheckpointKeys, artifact_key

BASE = "tuneforge/tiny-chat"


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    status: int


class VllmStub:
    """A stand-in vLLM server (see the module docstring) on a fixed port, so that it can restart."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loras: dict[str, str] = {}  # lora_name -> lora_path, as vLLM holds them in memory
        self.received: list[Received] = []
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "Not Found"}})
                models = [{"id": stub.base, "object": "model", "root": stub.base, "parent": None}]
                models += [
                    {"id": name, "object": "model", "root": path, "parent": stub.base}
                    for name, path in stub.loras.items()
                ]
                self._send(200, {"object": "list", "data": models})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                status, answer = self._answer(body)
                stub.received.append(Received(self.path, body, status))
                if status == 200 and body.get("stream"):
                    return self._stream(body, answer)
                self._send(status, answer)

            def _answer(self, body: dict[str, Any]) -> tuple[int, Any]:
                if self.path == "/v1/load_lora_adapter":
                    name, path = body["lora_name"], body["lora_path"]
                    if name in stub.loras:
                        return 400, _error(f"The lora adapter '{name}' has already been loaded.", 400)
                    if not (Path(path) / "adapter_config.json").is_file():
                        return 400, _error(f"No adapter found at {path}.", 400)
                    stub.loras[name] = path
                    return 200, f"Success: LoRA adapter '{name}' added successfully."
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    return 404, _error("Not Found", 404)
                model = body.get("model")
                if model != stub.base and model not in stub.loras:
                    return 404, _error(f"The model `{model}` does not exist.", 404)
                text = f"answer of {model}"
                if self.path == "/v1/chat/completions":
                    choice: dict[str, Any] = {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                    kind = "chat.completion"
                else:
                    choice, kind = {"index": 0, "text": text, "finish_reason": "stop"}, "text_completion"
                usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
                return 200, {
                    "id": "cmpl-stub",
                    "object": kind,
                    "created": 0,
                    "model": model,
                    "choices": [choice],
                    "usage": usage,
                }

            def _stream(self, body: dict[str, Any], whole: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                text = whole["choices"][0]["message"]["content"]
                for part, finish in ((text[:6], None), (text[6:], "stop")):
                    choice = {"index": 0, "delta": {"content": part}, "finish_reason": finish}
                    chunk = {**whole, "object": "chat.completion.chunk", "choices": [choice]}
                    del chunk["usage"]
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.write(b"data: [DONE]\n\n")

            def _send(self, status: int, answer: Any) -> None:
                send_json(self, status, answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """The server goes away, and with it every adapter loaded at run time."""
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        self.loras.clear()

    def loads(self) -> list[dict[str, Any]]:
        return [r.body for r in self.received if r.path == "/v1/load_lora_adapter"]


def _error(message: str, code: int) -> dict[str, Any]:
    """vLLM's error body."""
    return {
        "error": {
            "message": message,
            "type": "NotFoundError" if code == 404 else "BadRequestError",
            "param": None,
            "code": code,
        }
    }


@pytest.fixture(scope="module")
def vllm() -> Iterator[VllmStub]:
    stub = VllmStub(BASE)
    yield stub
    if stub.server is not None:
        stub.stop()


@pytest.fixture(scope="module")
def vllm_client(
    settings: Settings, vllm: VllmStub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    from tuneforge.api.app import create_app

    adapters = tmp_path_factory.mktemp("served-adapters")
    app = create_app(
        settings.model_copy(update={"inference_url": vllm.url, "inference_adapter_dir": adapters})
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    app.state.engine.dispose()


def _fine_tuned(project: ProjectCtx, app: FastAPI, training_file: str, tmp: Path) -> tuple[str, str]:
    """A succeeded LoRA job as a worker leaves it, its adapter (and a checkpoint's) in the store:
    (its model name, the checkpoint's name)."""
    created = project.openai.fine_tuning.jobs.create(
        model=BASE, training_file=training_file, extra_body={"adapter": {"type": "lora", "r": 8}}
    )
    name = f"ft:{BASE}:{project.id}::{created.id[-8:]}"
    archive = tmp / "adapter.tar.gz"
    (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp / "adapter_config.json", arcname="adapter_config.json")
    checkpoint_key = CheckpointKeys(created.id, "ftckpt-x").adapter
    for key in (artifact_key(created.id, "adapter"), checkpoint_key):
        app.state.store.put_file(key, archive)
    with session_scope(app.state.sessionmaker) as session:
        job = session.get(Job, created.id)
        assert job is not None
        job.status, job.fine_tuned_model = "succeeded", name
        add_checkpoint(session, job.id, step_number=10, storage_key=checkpoint_key)
        put_artifact(
            session,
            job.id,
            name="adapter",
            storage_key=artifact_key(job.id, "adapter"),
            size=archive.stat().st_size,
            sha256="0" * 64,
            content_type="application/gzip",
        )
    return name, f"{name}:ckpt-step-10"


def _ask(project: ProjectCtx, model: str) -> str:
    answer = project.openai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.model == model
    return str(answer.choices[0].message.content)


def test_the_api_hands_each_adapter_to_vllm_once_and_forwards_by_its_name(
    vllm_client: TestClient, vllm: VllmStub, chat_jsonl: str, tmp_path: Path
) -> None:
    project = new_project(vllm_client)
    app: FastAPI = vllm_client.app  # type: ignore[assignment]
    name, checkpoint = _fine_tuned(project, app, project.upload(chat_jsonl), tmp_path)
    vllm.received.clear()

    assert _ask(project, BASE) == f"answer of {BASE}"
    assert vllm.loads() == []  # the base needs no adapter

    assert _ask(project, name) == f"answer of {name}"
    [load] = vllm.loads()
    assert load["lora_name"] == name
    assert json.loads((Path(load["lora_path"]) / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert Path(load["lora_path"]).is_relative_to(app.state.settings.inference_adapter_dir)

    assert _ask(project, name) == f"answer of {name}"
    text = project.openai.completions.create(model=name, prompt="Once", max_tokens=4)
    assert text.choices[0].text == f"answer of {name}"
    streamed = project.openai.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == f"answer of {name}"
    assert _ask(project, checkpoint) == f"answer of {checkpoint}"
    assert [load["lora_name"] for load in vllm.loads()] == [name, checkpoint]  # each once

    forwarded = [r for r in vllm.received if r.path != "/v1/load_lora_adapter"]
    assert [(r.path, r.body["model"], r.status) for r in forwarded] == [
        ("/v1/chat/completions", BASE, 200),
        ("/v1/chat/completions", name, 200),
        ("/v1/chat/completions", name, 200),
        ("/v1/completions", name, 200),
        ("/v1/chat/completions", name, 200),
        ("/v1/chat/completions", checkpoint, 200),
    ]
    assert all("tuneforge" not in r.body for r in forwarded)  # the built-in engine's routing field


def test_after_a_vllm_restart_the_adapter_is_handed_over_again(
    vllm_client: TestClient, vllm: VllmStub, chat_jsonl: str, tmp_path: Path
) -> None:
    """vLLM forgets runtime-loaded adapters when it restarts: the API's first forward gets a 404,
    and the API hands the adapter over again and retries, once; later requests go straight through."""
    project = new_project(vllm_client)
    app: FastAPI = vllm_client.app  # type: ignore[assignment]
    name, _ = _fine_tuned(project, app, project.upload(chat_jsonl), tmp_path)
    assert _ask(project, name) == f"answer of {name}"

    vllm.stop()
    with pytest.raises(openai.InternalServerError) as down:
        _ask(project, name)
    assert down.value.status_code == 503
    vllm.start()
    vllm.received.clear()

    text = project.openai.completions.create(model=name, prompt="Once", max_tokens=4)
    assert text.choices[0].text == f"answer of {name}"
    assert _ask(project, name) == f"answer of {name}"
    assert [(r.path, r.body.get("model") or r.body.get("lora_name"), r.status) for r in vllm.received] == [
        ("/v1/completions", name, 404),
        ("/v1/load_lora_adapter", name, 200),
        ("/v1/completions", name, 200),
        ("/v1/chat/completions", name, 200),
    ]
    served = httpx.get(vllm.url + "/v1/models").raise_for_status().json()["data"]
    assert [(m["id"], m["parent"]) for m in served] == [(BASE, None), (name, BASE)]
