"""`score_model` and `label_model` graders: a model judges the sample, through an
OpenAI-compatible `POST {base_url}/chat/completions` the administrator configures
(`TUNEFORGE_GRADER_MODEL_URL`, e.g. Tuneforge's own `/v1` once it serves models, or any
OpenAI-compatible server).

The grader's `input` messages are rendered with the templates (`{{sample.output_text}}`,
`{{item.*}}`) and sent with a system message that asks for a JSON answer `{"result": ...}`;
`score_model` reads a number from it (or, failing JSON, the first number in the text) and
`label_model` one of its labels. A reply that does not parse is a `model_grader_parse_error`, a
failed call a `model_grader_server_error` with details, a refusal a `model_grader_refusal_error`:
all in `metadata.errors`, never an exception."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from tuneforge.graders.schema import LabelModelGrader, ModelInput, ScoreModelGrader
from tuneforge.graders.templates import Namespaces

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
#: Characters of a model's reply kept in error details.
MAX_DETAIL_CHARS = 500


@dataclass(frozen=True)
class ModelEndpoint:
    """Where model graders send their chat completions."""

    base_url: str
    api_key: str | None = None
    timeout_seconds: float = 60.0


@dataclass
class ModelVerdict:
    reward: float = 0.0
    errors: dict[str, bool] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] | None = None
    model: str | None = None


def _content_text(content: Any, namespaces: Namespaces) -> str:
    """A message's content as text, its templates filled: a string, or the text of its parts."""
    if isinstance(content, str):
        return namespaces.render(content)
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(namespaces.render(part))
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(namespaces.render(part["text"]))
    return "\n".join(texts)


def _messages(inputs: list[ModelInput], namespaces: Namespaces, instruction: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": instruction}]
    for message in inputs:
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": _content_text(message.content, namespaces)})
    return messages


def _call(endpoint: ModelEndpoint, body: dict[str, Any]) -> tuple[str | None, ModelVerdict]:
    """The reply's text, or None with the server error filled in."""
    verdict = ModelVerdict(model=body["model"])
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    url = endpoint.base_url.rstrip("/") + "/chat/completions"
    try:
        answer = httpx.post(url, json=body, headers=headers, timeout=endpoint.timeout_seconds)
    except httpx.HTTPError as exc:
        verdict.errors["model_grader_server_error"] = True
        verdict.details["model_grader_server_error_details"] = f"{type(exc).__name__}: {exc}"[
            :MAX_DETAIL_CHARS
        ]
        return None, verdict
    if answer.status_code != 200:
        verdict.errors["model_grader_server_error"] = True
        verdict.details["model_grader_server_error_details"] = (
            f"HTTP {answer.status_code}: {answer.text[:MAX_DETAIL_CHARS]}"
        )
        return None, verdict
    try:
        data = answer.json()
        message = data["choices"][0]["message"]
        usage = data.get("usage")
    except (ValueError, KeyError, IndexError, TypeError):
        verdict.errors["model_grader_server_error"] = True
        verdict.details["model_grader_server_error_details"] = (
            f"not a chat completion: {answer.text[:MAX_DETAIL_CHARS]}"
        )
        return None, verdict
    if isinstance(usage, dict):
        verdict.usage = {
            k: int(v) for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)
        }
    if isinstance(data.get("model"), str):
        verdict.model = data["model"]
    if isinstance(message, dict) and message.get("refusal"):
        verdict.errors["model_grader_refusal_error"] = True
        return None, verdict
    content = message.get("content") if isinstance(message, dict) else None
    return (content if isinstance(content, str) else ""), verdict


def _result(text: str) -> Any:
    """`result` of a JSON object in the reply (fenced or bare), else None."""
    stripped = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        data = json.loads(stripped)
    except (ValueError, RecursionError):
        return None
    if isinstance(data, dict):
        for key in ("result", "score", "label"):
            if key in data:
                return data[key]
    return data if isinstance(data, int | float | str) and not isinstance(data, bool) else None


def score(grader: ScoreModelGrader, namespaces: Namespaces, endpoint: ModelEndpoint) -> ModelVerdict:
    low, high = grader.range or [0.0, 1.0]
    instruction = (
        f"You are a grader. Score the answer as a number from {low:g} to {high:g}. "
        'Reply with JSON only: {"result": <number>}.'
    )
    body: dict[str, Any] = {
        "model": grader.model,
        "messages": _messages(grader.input, namespaces, instruction),
        "temperature": 0,
    }
    params = grader.sampling_params
    if params is not None:
        body.update(
            {
                key: value
                for key, value in {
                    "temperature": params.temperature,
                    "top_p": params.top_p,
                    "seed": params.seed,
                    "max_tokens": params.max_completions_tokens,
                }.items()
                if value is not None
            }
        )
    text, verdict = _call(endpoint, body)
    if text is None:
        return verdict
    value = _result(text)
    if value is None or isinstance(value, str):
        found = _NUMBER.search(text if value is None else value)
        value = float(found.group()) if found else None
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= float(value) <= high:
        verdict.errors["model_grader_parse_error"] = True
        verdict.details["model_grader_server_error_details"] = (
            f"no score in [{low:g}, {high:g}] in the reply: {text[:MAX_DETAIL_CHARS]}"
        )
        return verdict
    verdict.reward = float(value)
    return verdict


def label(grader: LabelModelGrader, namespaces: Namespaces, endpoint: ModelEndpoint) -> ModelVerdict:
    instruction = (
        f"You are a grader. Classify the answer with exactly one of these labels: "
        f"{', '.join(grader.labels)}. Reply with JSON only: " + '{"result": "<label>"}.'
    )
    body = {
        "model": grader.model,
        "messages": _messages(grader.input, namespaces, instruction),
        "temperature": 0,
    }
    text, verdict = _call(endpoint, body)
    if text is None:
        return verdict
    value = _result(text)
    candidate = (value if isinstance(value, str) else text).strip().strip("\"'.").casefold()
    chosen = next((name for name in grader.labels if name.casefold() == candidate), None)
    if chosen is None:
        verdict.errors["model_grader_parse_error"] = True
        verdict.details["model_grader_server_error_details"] = (
            f"no label among {grader.labels} in the reply: {text[:MAX_DETAIL_CHARS]}"
        )
        return verdict
    verdict.reward = 1.0 if chosen in grader.passing_labels else 0.0
    return verdict
