"""Serving what was trained, on `make run` defaults, through the openai SDK. One tiny-chat LoRA job
(four QA pairs, trained once for the module) gives four adapters: its fine-tuned model and its
three kept checkpoints. The model answers its questions through chat.completions (the base does
not), streaming gives the same text, a checkpoint name serves that checkpoint (as PEFT loads it
here), completions work, and 16 concurrent requests over the four adapters (mixed-adapter batches
in the engine) each get what their adapter answers alone. Short IA3 and prompt-tuning jobs answer
through the same call what their adapters compute with PEFT."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import Stack
from .flows import create_job, wait_job

pytestmark = pytest.mark.slow

QUESTIONS = 4
# Four pairs, each twice, four a step: 80 steps fix the answers (30 were not enough; n_epochs is
# at most 50; alpha 64 lifts the adapter above the random base, as in
# tests/training/test_learning.py). Checkpoints every 19 steps: 38, 57 and 76 are kept
# (keep_checkpoints=3), each a different adapter.
HYPERPARAMETERS = {
    "n_epochs": 40,
    "batch_size": QUESTIONS,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant",
    "save_every_steps": 19,
}
ADAPTER = {"type": "lora", "dropout": 0.0, "alpha": 64}
SYSTEM = {"role": "system", "content": "Answer briefly."}


@dataclass
class Trained:
    job_id: str
    model: str
    checkpoints: list[str]
    questions: list[str]
    answers: list[str]


@pytest.fixture(scope="module")
def trained(embedded: Stack, qa_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    client = embedded.sdk()
    rows = [json.loads(line) for line in qa_path.read_text().splitlines()][:QUESTIONS]
    path = tmp_path_factory.mktemp("inference-data") / "qa4.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows))
    # No retries: a create that answers slowly on a loaded machine must not start a second job.
    once = openai.OpenAI(base_url=embedded.base_url + "/v1", api_key=embedded.key, max_retries=0, timeout=300)
    job_id = create_job(once, path, hyperparameters=HYPERPARAMETERS, adapter=ADAPTER, suffix="serve")
    job = wait_job(client, job_id, timeout=1200)
    assert job.status == "succeeded" and job.fine_tuned_model, (job.error, embedded.logs())
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
    return Trained(
        job_id,
        job.fine_tuned_model,
        sorted(c.fine_tuned_model_checkpoint for c in checkpoints),
        [r["messages"][1]["content"] for r in rows],
        [r["messages"][2]["content"] for r in rows],
    )


def _ask(client: openai.OpenAI, model: str, question: str) -> str:
    answer = client.chat.completions.create(
        model=model,
        messages=[SYSTEM, {"role": "user", "content": question}],  # type: ignore[list-item]
        temperature=0,
        max_completion_tokens=16,
    )
    assert answer.object == "chat.completion" and answer.model == model
    assert answer.usage and answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    return answer.choices[0].message.content or ""


def test_fine_tuned_model_answers_what_it_was_taught_and_the_base_does_not(
    embedded: Stack, trained: Trained
) -> None:
    client = embedded.sdk()
    first = trained
    assert [_ask(client, first.model, q) for q in first.questions] == first.answers
    base = [_ask(client, "tuneforge/tiny-chat", q) for q in first.questions]
    assert not set(base) & set(first.answers), base


def test_streaming_gives_the_same_text_and_usage_last(embedded: Stack, trained: Trained) -> None:
    client = embedded.sdk()
    first = trained
    chunks = list(
        client.chat.completions.create(  # type: ignore[call-overload]
            model=first.model,
            messages=[SYSTEM, {"role": "user", "content": first.questions[1]}],
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.answers[1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_checkpoint_name_serves_the_checkpoint(
    embedded: Stack, trained: Trained, tiny_chat_path: Path, tmp_path: Path
) -> None:
    """The earliest checkpoint, served by name, answers as that checkpoint's adapter does when
    loaded here with PEFT (greedy)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = embedded.sdk()
    first = trained
    checkpoint = min(client.fine_tuning.jobs.checkpoints.list(first.job_id).data, key=lambda c: c.step_number)
    assert checkpoint.fine_tuned_model_checkpoint == f"{first.model}:ckpt-step-{checkpoint.step_number}"
    with embedded.http() as http:
        body = http.get(
            f"/v1/fine_tuning/jobs/{first.job_id}/checkpoints/{checkpoint.id}/artifacts/adapter"
        ).content
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        tar.extractall(tmp_path / "ckpt", filter="data")
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_path, dtype=torch.float32), tmp_path / "ckpt"
    ).eval()
    for question in first.questions[:2]:
        text = tokenizer.apply_chat_template(
            [SYSTEM, {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert _ask(client, checkpoint.fine_tuned_model_checkpoint, question) == expected


def test_completions_continue_a_prompt(embedded: Stack, trained: Trained) -> None:
    client = embedded.sdk()
    first = trained
    prompt = (
        "<|begin_of_text|><|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{first.questions[2]}<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = client.completions.create(model=first.model, prompt=prompt, max_tokens=16, temperature=0)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == first.answers[2] and answer.choices[0].finish_reason == "stop"
    assert answer.usage and answer.usage.prompt_tokens > 10
    short = client.completions.create(model=first.model, prompt=prompt, max_tokens=1, temperature=0, n=2)
    assert [c.finish_reason for c in short.choices] == ["length", "length"]
    assert short.usage and short.usage.completion_tokens == 2


def test_sixteen_concurrent_requests_over_four_adapters(embedded: Stack, trained: Trained) -> None:
    client = embedded.sdk()
    models = [trained.model, *trained.checkpoints]
    assert len(models) == 4
    asks = [(m, q) for m in models for q in trained.questions]
    alone = [_ask(client, m, q) for m, q in asks]
    assert alone[:QUESTIONS] == trained.answers
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda ask: _ask(client, *ask), asks))
    assert together == alone


def test_another_projects_model_and_unknown_names_are_404(embedded: Stack, trained: Trained) -> None:
    admin = {"Authorization": f"Bearer {embedded.key}"}
    with httpx.Client(base_url=embedded.base_url, timeout=30) as http:
        project = http.post("/v1/admin/projects", json={"name": "other"}, headers=admin).json()
        key = http.post(f"/v1/admin/projects/{project['id']}/api_keys", headers=admin).json()["value"]
    other = openai.OpenAI(base_url=embedded.base_url + "/v1", api_key=key, max_retries=0)
    for name in (trained.model, trained.model + ":ckpt-step-10", "ft:nothing", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            _ask(other, name, "What is the capital of France?")
        assert caught.value.code == "model_not_found", name
    with pytest.raises(openai.BadRequestError) as bad:
        embedded.sdk().chat.completions.create(model=trained.model, messages=[], temperature=0)
    assert bad.value.param == "messages"


# IA3 and prompt tuning through the same SDK call, each trained 10 steps on the same four pairs
# (default learning rates): a test-sized run moves the weights but does not fix the answers (80
# steps at 10x the rate came close for IA3 and took minutes), so the served answers are checked
# against what the downloaded adapter computes with PEFT.
OTHER_METHODS = {
    "ia3": {"type": "ia3"},
    "prompt_tuning": {"type": "prompt_tuning", "num_virtual_tokens": 8},
}


def _peft_answer(embedded: Stack, job_id: str, tiny_chat_path: Path, tmp: Path, question: str) -> str:
    """The job's adapter, downloaded and run greedily as training runs it: PEFT's forward over the
    whole sequence at each step (PEFT 0.21's `generate` misplaces prompt-learning virtual tokens
    with transformers 5)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp / job_id
    if not target.exists():
        with embedded.http() as http:
            body = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter").content
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            tar.extractall(target, filter="data")
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_path), target).eval()
    text = tokenizer.apply_chat_template(
        [SYSTEM, {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    prompt_length = ids.shape[1]
    with torch.no_grad():
        for _ in range(16):
            token = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            if int(token) == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return str(tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True))


@pytest.mark.parametrize("adapter_type", sorted(OTHER_METHODS))
def test_ia3_and_prompt_tuning_models_answer_through_chat_completions(
    embedded: Stack, qa_path: Path, tiny_chat_path: Path, tmp_path: Path, adapter_type: str
) -> None:
    """The fine-tuned model answers through chat.completions (on a runner of its own in the
    engine) what its adapter computes with PEFT, greedily; with a seed, reproducibly; streamed,
    the same text."""
    client = embedded.sdk()
    rows = [json.loads(line) for line in qa_path.read_text().splitlines()][:QUESTIONS]
    path = tmp_path / "qa4.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows))
    once = openai.OpenAI(base_url=embedded.base_url + "/v1", api_key=embedded.key, max_retries=0, timeout=300)
    hyperparameters = {"n_epochs": 5, "batch_size": QUESTIONS, "lr_scheduler_type": "constant"}
    job_id = create_job(
        once,
        path,
        hyperparameters=hyperparameters,
        adapter=OTHER_METHODS[adapter_type],
        suffix=adapter_type.replace("_", "-"),
    )
    job = wait_job(client, job_id, timeout=900)
    assert job.status == "succeeded" and job.fine_tuned_model, (job.error, embedded.logs())
    model = job.fine_tuned_model
    questions = [r["messages"][1]["content"] for r in rows]

    greedy = [_ask(client, model, q) for q in questions]
    assert greedy == [_peft_answer(embedded, job_id, tiny_chat_path, tmp_path, q) for q in questions]
    assert [_ask(client, model, q) for q in questions] == greedy
    sampled = [
        client.chat.completions.create(
            model=model,
            messages=[SYSTEM, {"role": "user", "content": questions[0]}],  # type: ignore[list-item]
            temperature=1.0,
            seed=5,
            max_completion_tokens=16,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    chunks = client.chat.completions.create(
        model=model,
        messages=[SYSTEM, {"role": "user", "content": questions[1]}],  # type: ignore[list-item]
        temperature=0,
        max_completion_tokens=16,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy[1]
