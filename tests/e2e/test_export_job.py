"""GGUF export through the service (issue 10), on `make run` defaults through the openai SDK: a job
with `export: ["gguf"]` (and not "merged") stores a `gguf` artifact, downloaded through the API, whose
Modelfile stops on the chat template's end-of-turn token and whose model.gguf, loaded in llama.cpp
(llama-cpp-python) and asked through llama.cpp's own chat completion (the chat template inside the
GGUF, its stop token), answers the trained questions as the job's PyTorch weights do, greedy: the
adapter on the base for a LoRA job, the `model` artifact for a full fine-tune.

tests/training/test_gguf.py checks the converter in-process (tokenization, the embedded template,
the Modelfile's TEMPLATE rendered, q8_0); this module checks the worker's path to the artifact."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.training.conftest import greedy_answers
from tuneforge.training.gguf import GGUF_FILE, MODELFILE, missing_requirements

from .conftest import Stack
from .flows import download_adapter, wait_job

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra (make installs it)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_requirements()), reason="llama.cpp's converter not installed"),
]

PICKED = (0, 3, 6, 7)  # four questions unlike each other, as in tests/training/test_gguf.py
# Each step all four questions; one checkpoint. Measured in-process (seed 7): a LoRA learns all four
# in 30 steps (3 in 25), a full fine-tune all four in 30 steps at lr 1e-3 (and at 2e-3).
LORA = {
    "hyperparameters": {
        "max_steps": 30,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "save_every_steps": 30,
    },
    "adapter": {"type": "lora", "dropout": 0.0, "alpha": 64},
}
FULL = {
    "hyperparameters": {
        "max_steps": 30,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "save_every_steps": 30,
    },
    "adapter": {"type": "full"},
}


@pytest.fixture(scope="module")
def jobs(embedded: Stack, qa_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Both jobs, created together (the embedded worker runs them one after the other) on one upload."""
    lines = qa_path.read_text().splitlines()
    path = tmp_path_factory.mktemp("export-data") / "qa4.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in PICKED))
    # No retries: a create that answers slowly on a loaded machine must not start a second job.
    once = openai.OpenAI(base_url=embedded.base_url + "/v1", api_key=embedded.key, max_retries=0, timeout=300)
    with path.open("rb") as handle:
        training_file = once.files.create(file=(path.name, handle), purpose="fine-tune").id
    created = {}
    for name, settings in (("lora", LORA), ("full", FULL)):
        method: Any = {"type": "supervised", "supervised": {"hyperparameters": settings["hyperparameters"]}}
        job = once.fine_tuning.jobs.create(
            model="tuneforge/tiny-chat",
            training_file=training_file,
            suffix=f"gguf-{name}",
            seed=7,
            method=method,
            extra_body={"adapter": settings["adapter"], "export": ["gguf"]},
        )
        assert job.model_extra and job.model_extra["export"] == ["gguf"]
        created[name] = job.id
    client = embedded.sdk()
    for job_id in created.values():
        done = wait_job(client, job_id, timeout=1200)
        assert done.status == "succeeded", (done.error, embedded.logs())
    return created


def _download(stack: Stack, job_id: str, name: str, target: Path) -> list[str]:
    """The job's `name` artifact through the API, checked against its listing and unpacked into
    `target`; returns the archive's member names."""
    with stack.http() as http:
        listing = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]
        body = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/{name}")
    assert body.status_code == 200, body.text
    [entry] = [a for a in listing if a["name"] == name]
    assert (len(body.content), hashlib.sha256(body.content).hexdigest()) == (entry["bytes"], entry["sha256"])
    with tarfile.open(fileobj=io.BytesIO(body.content), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
        return tar.getnames()


def _artifact_names(stack: Stack, job_id: str) -> set[str]:
    with stack.http() as http:
        return {a["name"] for a in http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]}


def _prompts(qa_path: Path) -> tuple[list[list[dict[str, str]]], list[str]]:
    rows = [json.loads(line)["messages"] for line in qa_path.read_text().splitlines()]
    picked = [rows[i] for i in PICKED]
    return [m[:-1] for m in picked], [m[-1]["content"] for m in picked]


def _check_modelfile(directory: Path) -> None:
    text = (directory / MODELFILE).read_text()
    lines = text.splitlines()
    assert f"FROM ./{GGUF_FILE}" in lines
    assert any(line.startswith('TEMPLATE """') for line in lines), text
    stops = [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == ["<|im_end|>"], text  # the end of an assistant turn in tiny-chat's template


def _llama_chat_answers(model_path: Path, prompts: list[list[dict[str, str]]]) -> list[str]:
    """Greedy answers through llama.cpp's chat completion: the GGUF's own chat template and stop."""
    llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_threads=1, verbose=False)
    answers = []
    for prompt in prompts:
        out: Any = llm.create_chat_completion(prompt, max_tokens=16, temperature=0.0)
        assert out["choices"][0]["finish_reason"] == "stop", out
        answers.append(out["choices"][0]["message"]["content"].strip())
    return answers


def test_a_lora_jobs_gguf_answers_like_its_adapter(
    embedded: Stack, jobs: dict[str, str], qa_path: Path, tiny_chat_path: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_id = jobs["lora"]
    assert _artifact_names(embedded, job_id) == {"adapter", "gguf"}  # no "merged": it was not asked
    names = _download(embedded, job_id, "gguf", tmp_path / "gguf")
    assert sorted(names) == sorted([GGUF_FILE, MODELFILE])
    _check_modelfile(tmp_path / "gguf")

    adapter = download_adapter(embedded, job_id, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_path), adapter)
    prompts, expected = _prompts(qa_path)
    torch_answers = greedy_answers(model, tokenizer, prompts)
    # it learned them (the comparison below is what this test is about)
    assert sum(a == e for a, e in zip(torch_answers, expected, strict=True)) >= 3, torch_answers
    assert _llama_chat_answers(tmp_path / "gguf" / GGUF_FILE, prompts) == torch_answers


def test_a_full_fine_tunes_gguf_answers_like_its_model(
    embedded: Stack, jobs: dict[str, str], qa_path: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_id = jobs["full"]
    assert _artifact_names(embedded, job_id) == {"model", "gguf"}
    names = _download(embedded, job_id, "gguf", tmp_path / "gguf")
    assert sorted(names) == sorted([GGUF_FILE, MODELFILE])
    _check_modelfile(tmp_path / "gguf")

    _download(embedded, job_id, "model", tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompts, expected = _prompts(qa_path)
    torch_answers = greedy_answers(
        AutoModelForCausalLM.from_pretrained(tmp_path / "model"), tokenizer, prompts
    )
    assert sum(a == e for a, e in zip(torch_answers, expected, strict=True)) >= 3, torch_answers
    assert _llama_chat_answers(tmp_path / "gguf" / GGUF_FILE, prompts) == torch_answers
