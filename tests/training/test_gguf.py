"""GGUF export (issue 10): a trained tiny-chat, converted by llama.cpp's own converter, answers its
trained questions in llama.cpp (llama-cpp-python) as the PyTorch model does, greedy; the Ollama
Modelfile's TEMPLATE renders the prompt the tokenizer's chat template renders.

One LoRA run (module fixture, export merged + gguf) serves every test here. Ollama itself (Go)
is not on this machine: its TEMPLATE is rendered by `render_go_template` below, a small
interpreter of the part of Go's text/template that the exporter writes (text, `{{ range
.Messages }}`, `{{ if/else if eq .Role "..." }}`, `{{ end }}`, `{{ .Content }}`, quoted strings)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.conftest import DATA, greedy_answers, make_spec, qa_pairs, train, write_jsonl
from tuneforge.training.gguf import (
    GGUF_FILE,
    MODELFILE,
    export_gguf,
    known_pre_tokenizer,
    missing_requirements,
)

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra (make installs it)")
gguf_reader = pytest.importorskip("gguf", reason="the gguf extra (make installs it)")

pytestmark = pytest.mark.skipif(bool(missing_requirements()), reason="llama.cpp's converter not installed")

PICKED = (0, 3, 6, 7)  # four questions unlike each other (two capitals, two colours)


@pytest.fixture(scope="module")
def trained(tiny_chat_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA that learned 4 answers by heart (60 steps), exported merged and as GGUF (f16)."""
    lines = (DATA / "qa.jsonl").read_text().splitlines()
    rows = [json.loads(lines[i]) for i in PICKED]
    out = tmp_path_factory.mktemp("gguf-run")
    train_file = write_jsonl(out / "train.jsonl", rows)
    spec = make_spec(
        adapter={"type": "lora", "dropout": 0.0, "alpha": 64},
        export=["merged", "gguf"],
        n_epochs=30,
        batch_size=2,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
    )
    finished = train(spec, tiny_chat_path, train_file, out / "run")
    result = finished.result
    assert result.gguf_dir is not None and result.merged_dir is not None
    return {
        "gguf_dir": result.gguf_dir,
        "merged_dir": result.merged_dir,
        "pairs": [qa_pairs()[i] for i in PICKED],
    }


def llama_answers(model_path: Path, tokenizer: Any, prompts: list[list[dict[str, str]]]) -> list[str]:
    llm = llama_cpp.Llama(str(model_path), n_ctx=256, n_threads=1, verbose=False)
    answers = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # the same tokenizer
        out = llm.create_completion(ids, max_tokens=16, temperature=0.0)
        answers.append(out["choices"][0]["text"].strip())
    return answers


def test_the_gguf_answers_like_the_pytorch_model(trained: dict[str, Any]) -> None:
    merged = trained["merged_dir"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompts = [p for p, _ in trained["pairs"]]
    expected = [a for _, a in trained["pairs"]]
    torch_answers = greedy_answers(AutoModelForCausalLM.from_pretrained(merged), tokenizer, prompts)
    # it learned them (seed 7: all four; the comparison below is what this test is about)
    assert sum(a == e for a, e in zip(torch_answers, expected, strict=True)) >= 3, torch_answers
    assert llama_answers(trained["gguf_dir"] / GGUF_FILE, tokenizer, prompts) == torch_answers


def test_the_gguf_carries_the_tokenizer_and_a_renderable_chat_template(trained: dict[str, Any]) -> None:
    reader = gguf_reader.GGUFReader(trained["gguf_dir"] / GGUF_FILE)

    def field(name: str) -> Any:
        return reader.fields[name].contents()

    assert field("tokenizer.ggml.pre") == "gpt-2"  # our trained tokenizer's hash is not upstream's
    tokenizer = AutoTokenizer.from_pretrained(trained["merged_dir"])
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    template = field("tokenizer.chat_template")
    assert "% generation %" not in template and "endgeneration" not in template  # training-only tags
    for messages in CONVERSATIONS:
        rendered = (
            jinja2.Environment()
            .from_string(template)
            .render(messages=messages, bos_token=tokenizer.bos_token, add_generation_prompt=True)
        )
        assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi {{ there }}"},
        {"role": "assistant", "content": "Hello.\n"},
        {"role": "user", "content": "And now?"},
    ],
]


def test_the_modelfile_template_renders_the_training_prompt(trained: dict[str, Any]) -> None:
    text = (trained["gguf_dir"] / MODELFILE).read_text()
    assert f"FROM ./{GGUF_FILE}" in text.splitlines()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert template is not None
    stops = [
        json.loads(line.split(" ", 2)[2]) for line in text.splitlines() if line.startswith("PARAMETER stop ")
    ]
    assert stops == ["<|im_end|>"]
    tokenizer = AutoTokenizer.from_pretrained(trained["merged_dir"])
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go_template(template.group(1), messages) == expected


def test_q8_0_loads_in_llama_cpp_and_answers(trained: dict[str, Any], tmp_path: Path) -> None:
    exported = export_gguf(trained["merged_dir"], tmp_path / "gguf", "q8_0", "tuneforge/tiny-chat")
    path = exported.directory / GGUF_FILE
    assert gguf_reader.GGUFReader(path).fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert path.stat().st_size < (trained["gguf_dir"] / GGUF_FILE).stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(trained["merged_dir"])
    prompt, answer = trained["pairs"][0]
    assert llama_answers(path, tokenizer, [prompt]) == [answer]


def test_pre_tokenizer_named_only_for_gpt2_splitting(tiny_chat_path: Path) -> None:
    ours = json.loads((tiny_chat_path / "tokenizer.json").read_text())
    assert known_pre_tokenizer(ours) == "gpt-2"
    llama3_like = {**ours, "pre_tokenizer": {"type": "Sequence", "pretokenizers": []}}
    assert known_pre_tokenizer(llama3_like) is None
    assert known_pre_tokenizer({**ours, "normalizer": {"type": "NFC"}}) is None


# --- the part of Go's text/template that Modelfiles written here use ------------------------------

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_go_template(source: str, messages: list[dict[str, str]]) -> str:
    tokens: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(source):
        text = source[position : match.start()]
        if match.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim":
            text = text.lstrip()
            tokens.pop()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        if match.group(3):
            tokens.append(("trim", ""))
        position = match.end()
    tail = source[position:]
    if tokens and tokens[-1][0] == "trim":
        tail = tail.lstrip()
        tokens.pop()
    tokens.append(("text", tail))
    out, _ = _run(tokens, 0, {"Messages": messages}, emit=True)
    return out


def _run(tokens: list[tuple[str, str]], i: int, dot: dict[str, Any], emit: bool) -> tuple[str, int]:
    """Runs from tokens[i] to the matching `end` (or `else ...` at this level); returns (text, index)."""
    out = ""
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            out += value if emit else ""
            i += 1
        elif value == "end" or value.startswith("else"):
            return out, i
        elif value == "range .Messages":
            _, end = _run(tokens, i + 1, {}, emit=False)
            for message in dot["Messages"] if emit else []:
                out += _run(tokens, i + 1, message, emit=True)[0]
            i = end + 1
        elif value.startswith("if "):
            taken = False
            condition = value[3:]
            while True:
                holds = emit and not taken and _holds(condition, dot)
                text, i = _run(tokens, i + 1, dot, holds)
                out += text
                taken = taken or holds
                branch = tokens[i][1]
                if branch == "end":
                    i += 1
                    break
                condition = branch[len("else if ") :] if branch.startswith("else if ") else "true"
        elif value == ".Content":
            out += dot.get("content", "") if emit else ""
            i += 1
        elif value.startswith('"'):
            out += json.loads(value) if emit else ""
            i += 1
        else:
            raise AssertionError(f"the test's Go template subset lacks {{{{ {value} }}}}")
    return out, i


def _holds(condition: str, dot: dict[str, Any]) -> bool:
    if condition == "true":
        return True
    match = re.fullmatch(r'eq \.Role (".*")', condition)
    assert match, condition
    return bool(dot.get("role") == json.loads(match.group(1)))
