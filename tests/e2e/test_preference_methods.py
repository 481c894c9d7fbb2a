"""Issue 9 through the openai SDK on `make run`'s stack (the embedded worker trains tiny-chat for
real): ORPO, SimPO and KTO jobs raise the chosen-vs-rejected margin over the base on held-out
pairs (prompts never trained on), and a reward_model job's artifact, loaded as README says, ranks
the held-out chosen answer above the rejected one on most pairs.

The four jobs are created together by one fixture, so the worker trains them back to back while
the tests wait on and check them one by one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support.preferences import HELD_OUT, TRAIN, feedback_lines, mean_margin, preference_pair

from .conftest import Stack
from .flows import download_adapter, metric_events, wait_job

pytestmark = pytest.mark.slow

# 12 steps of batch 8 at a constant 3e-3 (the reward model on its default schedule), seed 7.
SEED = 7
STEPS: dict[str, Any] = {"max_steps": 12, "batch_size": 8, "learning_rate": 3e-3}
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "orpo": ("pairs", {"beta": 0.5}),
    "simpo": ("pairs", {"beta": 2.0, "gamma": 0.5}),
    "kto": ("feedback", {"beta": 0.1}),
}


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _upload(client: OpenAI, path: Path) -> str:
    with path.open("rb") as handle:
        return client.files.create(file=(path.name, handle), purpose="fine-tune").id


def _create(client: OpenAI, method: str, training_file: str, hyperparameters: dict[str, Any]) -> str:
    section: Any = {"type": method, method: {"hyperparameters": hyperparameters}}
    # No automatic retry: a create that outlasted the client's timeout would be sent twice.
    return (
        client.with_options(max_retries=0, timeout=600)
        .fine_tuning.jobs.create(
            model="tuneforge/tiny-chat",
            training_file=training_file,
            seed=SEED,
            method=section,
            extra_body={"adapter": {"type": "lora"}},
        )
        .id
    )


@pytest.fixture(scope="module")
def jobs(embedded: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Job ids by method, every job created before any is waited on."""
    client = embedded.sdk()
    root = tmp_path_factory.mktemp("preference-files")
    files = {
        "pairs": _upload(client, _write(root / "pairs.jsonl", [preference_pair(t) for t in TRAIN])),
        "feedback": _upload(
            client, _write(root / "feedback.jsonl", [r for t in TRAIN for r in feedback_lines(t)])
        ),
    }
    ids = {
        method: _create(client, method, files[file], {**STEPS, "lr_scheduler_type": "constant", **knobs})
        for method, (file, knobs) in METHODS.items()
    }
    ids["reward_model"] = _create(client, "reward_model", files["pairs"], STEPS)
    return ids


@pytest.fixture(scope="module")
def held_out(tiny_chat_path: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The 8 held-out pairs as the DPO reader gives them (prompt, chosen, rejected messages)."""
    from transformers import AutoTokenizer

    from tuneforge.training.data import read_training_file

    path = _write(
        tmp_path_factory.mktemp("held-out") / "held_out.jsonl", [preference_pair(t) for t in HELD_OUT]
    )
    return read_training_file(path, "dpo", AutoTokenizer.from_pretrained(tiny_chat_path), 1024).rows


@pytest.fixture(scope="module")
def base_margin(tiny_chat_path: Path, held_out: list[dict[str, Any]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    return mean_margin(AutoModelForCausalLM.from_pretrained(tiny_chat_path), tokenizer, held_out)


def _succeeded(stack: Stack, job_id: str, method: str, tmp: Path) -> Path:
    """The job succeeded as a `method` job of 12 steps with the knobs it was given (the job echoes
    them; the run reports the beta it trained with); returns its downloaded adapter."""
    client = stack.sdk()
    job = wait_job(client, job_id, timeout=1200)
    assert job.status == "succeeded", (job.error, stack.logs())
    assert job.method is not None and job.method.type == method
    given = METHODS[method][1] if method in METHODS else {}
    created: dict[str, Any] = job.to_dict()
    echoed = created["method"][method]["hyperparameters"]
    assert {k: echoed.get(k) for k in given} == given, echoed
    if "beta" in given:
        assert _effective_hyperparameters(client, job_id)["beta"] == given["beta"]
    assert [m["step"] for m in metric_events(client, job_id)][-1] == STEPS["max_steps"]
    adapter = download_adapter(stack, job_id, tmp / method)
    assert (adapter / "adapter_model.safetensors").is_file()
    return adapter


def _effective_hyperparameters(client: OpenAI, job_id: str) -> dict[str, Any]:
    """What the run reported it trained with (the "Training started" event)."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    started = next(e for e in events if e.message.startswith("Training started"))
    data: Any = started.data
    assert data is not None
    return dict(data["hyperparameters"])


@pytest.mark.parametrize("method", list(METHODS))
def test_method_raises_the_held_out_margin(
    method: str,
    embedded: Stack,
    jobs: dict[str, str],
    held_out: list[dict[str, Any]],
    base_margin: float,
    tiny_chat_path: Path,
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _succeeded(embedded, jobs[method], method, tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_path), adapter)
    trained_margin = mean_margin(model, tokenizer, held_out)
    # Measured (seed 7, 12 steps): base -41.3; orpo 10.4, simpo 4.6, kto 18.9 (what the recipes
    # reach in-process too); the smallest gain, SimPO's 45.9, keeps more than twice the bound.
    assert trained_margin > base_margin + 20, (method, base_margin, trained_margin)


def test_reward_model_ranks_held_out_pairs(
    embedded: Stack,
    jobs: dict[str, str],
    held_out: list[dict[str, Any]],
    tiny_chat_path: Path,
    tmp_path: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.training.reward import score

    adapter = _succeeded(embedded, jobs["reward_model"], "reward_model", tmp_path)
    # The artifact alone, as README tells a user to load it: the base as a one-label classifier
    # plus the adapter (whose saved modules carry the score head).
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_chat_path, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(base, adapter).eval()
    right = sum(
        score(model, tokenizer, p["prompt"], p["chosen"])
        > score(model, tokenizer, p["prompt"], p["rejected"])
        for p in held_out
    )
    # Measured (seed 7, 12 steps): 8 of 8.
    assert right >= 7, f"{right} of {len(held_out)} held-out pairs ranked chosen above rejected"
