"""The engine's HTTP side (`tuneforge inference`'s app, in-process) on the base tiny-chat: the
request options that change what is decoded (`stop`, `top_p`, `logprobs`) checked against the
greedy answer they should cut, keep or describe, and what comes back checked byte for byte (SSE
streams end with `data: [DONE]`) and against the tokenizer (`usage.prompt_tokens`)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tuneforge.config import Settings
from tuneforge.inference.server import create_engine_app

BASE = "tuneforge/tiny-chat"
ROUTE = {"tuneforge": {"base_model": BASE}}
# The base's answer to this runs to its length with no end token, and its first dozen tokens are
# whole ASCII words (others start with bytes of unfinished UTF-8 characters, which a stream holds
# back anyway): `length` answers are their tokens' texts joined.
QUESTION = [{"role": "user", "content": "hi"}]
PROMPTS = ["The capital of France is", "Once upon a time"]


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat_path: Path, models_dir: Path
) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("engine"), models_dir=models_dir)
    with TestClient(create_engine_app(settings)) as client:
        yield client


def _post(engine: TestClient, path: str, **body: Any) -> dict[str, Any]:
    answer = engine.post(path, json={"model": BASE, "temperature": 0, **ROUTE, **body})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _chat(engine: TestClient, **body: Any) -> dict[str, Any]:
    return _post(engine, "/v1/chat/completions", messages=QUESTION, **body)


def _stream(engine: TestClient, path: str, **body: Any) -> tuple[bytes, list[dict[str, Any]]]:
    """The raw bytes of a streamed answer and its chunks (every event but the last, `[DONE]`)."""
    payload = {"model": BASE, "temperature": 0, "stream": True, **ROUTE, **body}
    with engine.stream("POST", path, json=payload) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(answer.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]", raw[-200:]
    assert all(e.startswith(b"data: ") for e in events[:-1])
    return raw, [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]


def _greedy_tokens(engine: TestClient, max_tokens: int) -> tuple[str, list[str]]:
    """The base's greedy answer to QUESTION and its tokens' texts (from logprobs)."""
    whole = _chat(engine, max_tokens=max_tokens, logprobs=True)
    choice = whole["choices"][0]
    tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
    text = choice["message"]["content"]
    assert choice["finish_reason"] == "length" and "".join(tokens) == text
    assert text.isascii(), text
    return text, tokens


def test_chat_and_completion_logprobs_in_openai_shape(engine: TestClient) -> None:
    """One entry per generated token, each a log probability (<= 0); under greedy decoding the
    chosen token is the likeliest, so its logprob is the first of the top ones."""
    plain = _chat(engine, max_tokens=4)
    assert plain["choices"][0]["logprobs"] is None

    whole = _chat(engine, max_tokens=10, logprobs=True, top_logprobs=3)
    [choice] = whole["choices"]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None
    assert len(content) == whole["usage"]["completion_tokens"] == 10
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"token", "logprob", "bytes"} for t in top)
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])

    _, chunks = _stream(engine, "/v1/chat/completions", messages=QUESTION, max_tokens=10, logprobs=True)
    streamed = [
        e
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert [(e["token"], e["logprob"]) for e in streamed] == [(e["token"], e["logprob"]) for e in content]

    completion = _post(engine, "/v1/completions", prompt=PROMPTS[0], max_tokens=8, logprobs=2)
    [choice] = completion["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens = logprobs["tokens"]
    assert (
        len(tokens) == completion["usage"]["completion_tokens"] == 8 and choice["finish_reason"] == "length"
    )
    assert "".join(tokens) == choice["text"]
    assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    for token, logprob, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 2
        assert max(top.values()) == logprob and top[token] == logprob


def test_stop_cuts_the_answer_and_a_stream_never_shows_part_of_a_stop(engine: TestClient) -> None:
    """A stop string two tokens long, first seen at a token boundary: the answer (whole or
    streamed) is the greedy answer up to it. Streamed, the engine must hold back its first token's
    text until the second shows whether the stop matched, so the joined deltas have none of it; a
    stop that starts like the answer and then differs releases what was held back."""
    text, tokens = _greedy_tokens(engine, 12)
    offsets = [len("".join(tokens[:i])) for i in range(len(tokens))]
    found = [
        i
        for i in range(1, len(tokens) - 1)
        if (tokens[i] + tokens[i + 1]).strip() and text.find(tokens[i] + tokens[i + 1]) == offsets[i] > 0
    ]
    assert found, tokens
    first = found[0]
    stop, cut = tokens[first] + tokens[first + 1], offsets[first]

    whole = _chat(engine, max_tokens=12, stop=["\u2603 never", stop])
    assert whole["choices"][0]["message"]["content"] == text[:cut]
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == first + 2  # decoding ended with the stop's last token

    _, chunks = _stream(engine, "/v1/chat/completions", messages=QUESTION, max_tokens=12, stop=stop)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(deltas) == text[:cut]
    assert sum(1 for d in deltas if d) >= 2, "the answer should arrive in several chunks"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    never = tokens[first] + "\u2603"  # the answer has its first token, never what follows
    _, chunks = _stream(engine, "/v1/chat/completions", messages=QUESTION, max_tokens=12, stop=never)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    completion = _post(engine, "/v1/completions", prompt=PROMPTS[1], max_tokens=12)
    whole_text = completion["choices"][0]["text"]
    middle = whole_text[len(whole_text) // 2 :].strip()[:3]
    assert middle, whole_text
    _, chunks = _stream(engine, "/v1/completions", prompt=PROMPTS[1], max_tokens=12, stop=middle)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole_text[: whole_text.find(middle)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streams_end_with_done_and_carry_the_whole_answer(engine: TestClient) -> None:
    """Chat and text completion streams: `data:` events, the last `data: [DONE]`; joined, the
    deltas are the whole answer, and with include_usage the last chunk before [DONE] has no
    choices and the whole answer's usage."""
    whole = _chat(engine, max_tokens=8)
    raw, chunks = _stream(
        engine,
        "/v1/chat/completions",
        messages=QUESTION,
        max_tokens=8,
        stream_options={"include_usage": True},
    )
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert joined == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    texts = _post(engine, "/v1/completions", prompt=PROMPTS, max_tokens=6)
    raw, chunks = _stream(engine, "/v1/completions", prompt=PROMPTS, max_tokens=6)
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    assert all(c["object"] == "text_completion" for c in chunks)
    streamed = ["", ""]
    for chunk in chunks:
        [choice] = chunk["choices"]
        streamed[choice["index"]] += choice["text"]
    assert streamed == [c["text"] for c in texts["choices"]]


def test_prompt_tokens_are_the_tokenizers_count_of_the_rendered_prompt(
    engine: TestClient, tiny_chat_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    messages = [{"role": "system", "content": "You answer briefly."}, *QUESTION]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(rendered, str) and "You answer briefly." in rendered
    counted = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    usage = _post(engine, "/v1/chat/completions", messages=messages, max_tokens=2)["usage"]
    assert usage["prompt_tokens"] == counted
    assert usage["total_tokens"] == counted + usage["completion_tokens"]

    # Several prompts, several choices each: every prompt counted once.
    usage = _post(engine, "/v1/completions", prompt=PROMPTS, n=2, max_tokens=2)["usage"]
    assert usage["prompt_tokens"] == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)


def test_a_tiny_top_p_samples_the_greedy_answer(engine: TestClient) -> None:
    """top_p keeps the likeliest tokens whose probabilities reach it: a tiny one keeps only the
    likeliest, so temperature 1 then answers greedily, whatever the seed. With top_p 1 the same
    seeds sample other answers (else this test would show nothing). The n=4 rows also share
    forwards, which /healthz reports."""
    greedy = _chat(engine, max_tokens=12)["choices"][0]["message"]["content"]
    narrow = _chat(engine, max_tokens=12, temperature=1.0, top_p=1e-6, n=4, seed=5)
    assert [c["message"]["content"] for c in narrow["choices"]] == [greedy] * 4
    wide = _chat(engine, max_tokens=12, temperature=1.0, top_p=1.0, n=4, seed=5)
    assert any(c["message"]["content"] != greedy for c in wide["choices"])

    health = engine.get("/healthz").json()
    batches = health["batches"][f"base:{BASE}"]
    assert batches["most_rows"] >= 4 and batches["rows"] >= batches["forwards"] > 0
    assert batches["most_adapters"] == 1  # the base only
