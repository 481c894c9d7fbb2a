"""The graders that need more than computation: `python` in its sandboxed process (no network,
no writable files, time, memory and output limits) and `score_model` / `label_model` against a
stub OpenAI-compatible chat server (tests/support/chat_stub.py: a stand-in, not a model)."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.chat_stub import ChatStub, chat_stub
from tuneforge.graders import GraderRuntime, parse_grader, run_grader
from tuneforge.graders.model import ModelEndpoint
from tuneforge.graders.sandbox import SandboxLimits, run_python_grader

PYTHON_RUNTIME = GraderRuntime(python=SandboxLimits(timeout_seconds=1.0, memory_mb=256))


def python(source: str) -> Any:
    return parse_grader({"type": "python", "name": "py", "source": source})


def errors_of(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result["metadata"]["errors"].items() if v}


def test_a_python_grader_scores_the_sample_against_the_item() -> None:
    grader = python(
        "import json\n"
        "def grade(sample, item):\n"
        "    print('noise')\n"
        "    return 1.0 if sample['output_json']['city'] == item['answer'] else 0.25\n"
    )
    hit = run_grader(grader, json.dumps({"city": "Paris"}), {"answer": "Paris"}, PYTHON_RUNTIME)
    miss = run_grader(grader, json.dumps({"city": "Lyon"}), {"answer": "Paris"}, PYTHON_RUNTIME)
    assert (hit["reward"], miss["reward"]) == (1.0, 0.25)
    assert errors_of(hit) == {}
    assert hit["metadata"]["type"] == "python"


@pytest.fixture
def listener() -> Iterator[int]:
    """A port on this machine that accepts connections (the grader must not reach it)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "body", "detail"),
    [
        ("loops forever", "    while True:\n        pass", r"time limit"),
        ("sleeps", "    import time\n    time.sleep(60)", r"time limit"),
        ("allocates gigabytes", "    block = bytearray(4 << 30)\n    return 1.0", r"memory limit"),
        ("returns no number", "    return 'yes'", r"must return a number"),
        ("raises", "    raise ValueError('bad item')", r"ValueError: bad item"),
        ("spawns a process", "    import os\n    os.system('true')\n    return 1.0", r"not allowed"),
        (
            "writes a file",
            "    open('/tmp/tuneforge-grader-wrote', 'w').write('x')\n    return 1.0",
            r"Read-only|not",
        ),
        ("floods stdout", "    import os\n    os.write(1, b'x' * (4 << 20))\n    return 1.0", None),
    ],
)
def test_a_misbehaving_python_grader_is_stopped_with_an_error(
    case: str, body: str, detail: str | None
) -> None:
    result = run_grader(python(f"def grade(sample, item):\n{body}\n"), "x", {}, PYTHON_RUNTIME)
    if detail is None:  # what it wrote to its own stdout went nowhere; its answer still counts
        assert result["reward"] == 1.0, result
        return
    errors = errors_of(result)
    assert result["reward"] == 0.0
    assert errors.get("python_grader_runtime_error") is True, (case, result)
    assert re.search(detail, errors["python_grader_runtime_error_details"]), (case, errors)
    assert not Path("/tmp/tuneforge-grader-wrote").exists()


def test_a_python_grader_cannot_reach_the_network(listener: int) -> None:
    body = f"    import socket\n    socket.create_connection(('127.0.0.1', {listener}), timeout=2)\n"
    result = run_grader(python(f"def grade(sample, item):\n{body}    return 1.0\n"), "x", {}, PYTHON_RUNTIME)
    assert result["reward"] == 0.0, result
    assert "not allowed" in errors_of(result)["python_grader_runtime_error_details"]


def test_the_sandbox_reports_its_isolation() -> None:
    """Below the audit hook: the network and mount namespaces, where this kernel grants them."""
    outcome = run_python_grader("def grade(sample, item):\n    return 1\n", {}, None, SandboxLimits(1.0, 256))
    assert outcome.reward == 1.0 and outcome.isolation
    if "network namespace" in outcome.isolation:
        assert outcome.isolation == ["network namespace", "read-only filesystem", "user namespace"]


def judge(body: dict[str, Any]) -> str | tuple[int, str]:
    """The stub's verdict: reads the rendered user message the grader sent."""
    text = body["messages"][-1]["content"]
    if "crash" in text:
        return 500, '{"error": {"message": "boom"}}'
    if body["messages"][0]["content"].count("labels"):
        return "Maybe." if "Berlin" in text else "correct" if "Paris" in text else '{"result": "incorrect"}'
    return '{"result": 0.9}' if "Paris" in text else "I would say 0.1"


@pytest.fixture(scope="module")
def stub() -> Iterator[ChatStub]:
    with chat_stub(judge) as running:
        yield running


def score_model(**extra: Any) -> dict[str, Any]:
    return {
        "type": "score_model",
        "name": "judge",
        "model": "tuneforge/tiny-chat",
        "input": [
            {"role": "developer", "content": "Compare with {{item.answer}}."},
            {"role": "user", "content": "Answer: {{sample.output_text}}"},
        ],
        **extra,
    }


LABEL = {
    "type": "label_model",
    "name": "label",
    "model": "tuneforge/tiny-chat",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Answer: {{sample.output_text}}"}]}
    ],
    "labels": ["correct", "incorrect"],
    "passing_labels": ["correct"],
}


def test_score_model_calls_the_configured_chat_endpoint(stub: ChatStub) -> None:
    runtime = GraderRuntime(model_endpoint=ModelEndpoint(stub.base_url, "grader-key", 10))
    grader = parse_grader(score_model(sampling_params={"temperature": 0.5, "seed": 3}))
    hit = run_grader(grader, "Paris", {"answer": "Paris"}, runtime)
    miss = run_grader(grader, "Lyon", {"answer": "Paris"}, runtime)
    assert (hit["reward"], miss["reward"]) == (0.9, 0.1)
    sent = stub.requests[-2]
    assert sent["model"] == "tuneforge/tiny-chat" and sent["temperature"] == 0.5 and sent["seed"] == 3
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert sent["messages"][1]["content"] == "Compare with Paris."
    assert stub.headers[-1]["Authorization"] == "Bearer grader-key"
    assert hit["metadata"]["token_usage"]["total_tokens"] == 13
    assert hit["model_grader_token_usage_per_model"]["tuneforge/tiny-chat"]["prompt_tokens"] == 10


def test_label_model_inside_multi_and_server_errors(stub: ChatStub) -> None:
    runtime = GraderRuntime(model_endpoint=ModelEndpoint(stub.base_url, None, 10))
    grader = parse_grader({"type": "multi", "name": "m", "graders": {"l": LABEL}, "calculate_output": "l"})
    assert run_grader(grader, "Paris", {}, runtime)["reward"] == 1.0
    wrong = run_grader(grader, "Lyon", {}, runtime)
    assert wrong["reward"] == 0.0 and errors_of(wrong) == {}
    unparsed = run_grader(grader, "Berlin", {}, runtime)
    assert errors_of(unparsed)["model_grader_parse_error"] is True
    failed = run_grader(parse_grader(score_model()), "crash", {"answer": "x"}, runtime)
    errors = errors_of(failed)
    assert failed["reward"] == 0.0 and errors["model_grader_server_error"] is True
    assert "HTTP 500" in errors["model_grader_server_error_details"]
    unreachable = GraderRuntime(model_endpoint=ModelEndpoint("http://127.0.0.1:9/v1", None, 2))
    down = run_grader(parse_grader(score_model()), "x", {"answer": "x"}, unreachable)
    assert errors_of(down)["model_grader_server_error"] is True
