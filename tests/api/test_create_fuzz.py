"""Create bodies that a client may send, valid or not: no server error.

A bounded hypothesis pass over `POST /v1/fine_tuning/jobs` and `POST /v1/fine_tuning/estimates`
against the in-process app (SQLite and PostgreSQL). Bodies are built around the real field names
with values of every JSON kind: non-finite floats (`Infinity`, `NaN`, as Python's json writes
them), integers past any 64-bit type, deep and odd shapes, and `model_config`s that are a small
real config with a few fields changed. Every answer is below 500 and a 400 has the error shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.conftest import ProjectCtx, new_project

MODEL = "tuneforge/tiny-chat"
#: Enough cases to find the classes of failure fixed so far in seconds, not minutes.
EXAMPLES = 200

NAMES = st.sampled_from(
    [
        "auto", "lora", "qlora", "dora", "ia3", "full", "prefix_tuning", "prompt_tuning", "supervised",
        "dpo", "pretraining", "reinforcement", "all-linear", "q_proj", "merged", "nf4", "cosine", "llama",
        "qwen2", "gpt2", "cpu", "gpu", "a100-80gb", "bf16", "", "\u00e9\u6570", MODEL,
    ]
)  # fmt: skip
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3000),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, 1, 2**31, 2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, 1.0]),
    st.text(max_size=12),
    NAMES,
)
VALUE = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | NAMES, inner, max_size=3)
    ),
    max_leaves=6,
)

EDGES = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, -0.0, 0, -1, 2**31, 10**400])


def pick(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value the field accepts (so a body gets past its first field), sometimes an edge
    value or any JSON at all."""
    odd = EDGES | VALUE
    return st.integers(0, 9).flatmap(lambda roll: odd if roll == 0 else valid)


AUTO = st.just("auto")
HYPERPARAMETERS = st.fixed_dictionaries(
    {},
    optional={
        "n_epochs": pick(st.integers(1, 5) | AUTO),
        "batch_size": pick(st.integers(1, 8) | AUTO),
        "learning_rate_multiplier": pick(st.floats(0.01, 10) | AUTO),
        "learning_rate": pick(st.floats(1e-6, 1e-2)),
        "max_steps": pick(st.integers(1, 50)),
        "max_seq_length": pick(st.integers(8, 512)),
        "gradient_accumulation_steps": pick(st.integers(1, 4)),
        "warmup_ratio": pick(st.floats(0, 0.9)),
        "lr_scheduler_type": pick(st.sampled_from(["linear", "cosine", "constant"])),
        "weight_decay": pick(st.floats(0, 1)),
        "packing": pick(st.none() | st.booleans()),
        "eval_every_steps": pick(st.integers(1, 100)),
        "save_every_steps": pick(st.integers(1, 100)),
        "early_stopping_patience": pick(st.integers(1, 5)),
        "beta": pick(st.floats(0.01, 2) | AUTO),
    },
)
ADAPTER = st.fixed_dictionaries(
    {},
    optional={
        "type": pick(st.sampled_from(["lora", "dora", "ia3", "full", "prefix_tuning", "prompt_tuning"])),
        "r": pick(st.integers(1, 64)),
        "alpha": pick(st.floats(1, 128)),
        "dropout": pick(st.floats(0, 0.9)),
        "target_modules": pick(
            st.just("all-linear")
            | st.lists(st.sampled_from(["q_proj", "v_proj", "up_proj", "nope"]), max_size=3)
        ),
        "num_virtual_tokens": pick(st.integers(1, 50)),
        "quant_type": pick(st.sampled_from(["nf4", "fp4"])),
    },
)


def _method(kind: str, hp: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, kind: {"hyperparameters": hp}}


METHOD = pick(st.builds(_method, st.sampled_from(["supervised", "dpo", "pretraining"]), HYPERPARAMETERS))


def job_bodies(file_id: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"model": pick(st.just(MODEL)), "training_file": pick(st.just(file_id))},
        optional={
            "method": METHOD,
            "adapter": pick(ADAPTER),
            "validation_file": pick(st.just(file_id)),
            "suffix": pick(st.text(min_size=1, max_size=70)),
            "seed": pick(st.integers(0, 2**31)),
            "metadata": pick(st.dictionaries(st.text(max_size=70), st.text(max_size=20), max_size=17)),
            "export": pick(st.sampled_from([[], ["merged"], ["merged", "merged"]])),
            "integrations": pick(
                st.lists(
                    st.fixed_dictionaries({"type": NAMES, "wandb": pick(st.just({"project": "p"}))}),
                    max_size=2,
                )
            ),
        },
    )


TINY_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CONFIG_FIELDS = st.sampled_from(
    [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rope_scaling", "rope_theta",
        "max_position_embeddings", "tie_word_embeddings", "num_experts", "hidden_act", "auto_map",
    ]
)  # fmt: skip
CONFIG_VALUE = st.one_of(
    st.integers(min_value=-2, max_value=70),
    st.sampled_from([0, 3, 7, 10**9, 2**63]),
    st.fixed_dictionaries({"type": NAMES | VALUE, "factor": VALUE}),
    st.fixed_dictionaries({"rope_type": NAMES | VALUE}),
    VALUE,
)
MODEL_CONFIG = pick(
    st.dictionaries(CONFIG_FIELDS, CONFIG_VALUE, max_size=3).map(lambda change: {**TINY_CONFIG, **change})
)
ESTIMATE_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "adapter": pick(ADAPTER),
        "method": METHOD,
        "n_tokens": pick(st.integers(1, 10**9)),
        "n_examples": pick(st.integers(1, 10**6)),
        "hyperparameters": HYPERPARAMETERS,
        "hardware": st.fixed_dictionaries(
            {}, optional={"gpu": VALUE, "gpu_memory_gb": VALUE, "count": VALUE}
        ),
        "dtype": VALUE,
        "data_format": VALUE,
        "gradient_checkpointing": VALUE,
    },
)


def _estimate_body(rest: dict[str, Any], which: str, model: Any, config: Any) -> dict[str, Any]:
    body = dict(rest)
    if which in ("model", "both"):
        body["model"] = model
    if which in ("config", "both"):
        body["model_config"] = config
    return body


ESTIMATE_BODIES = st.builds(
    _estimate_body,
    ESTIMATE_FIELDS,
    st.sampled_from(["model", "config", "config", "both", "neither"]),
    pick(st.just(MODEL)),
    MODEL_CONFIG,
)


@pytest.fixture(scope="module")
def fuzz_project(client: TestClient, chat_jsonl: str) -> Iterator[tuple[ProjectCtx, str]]:
    project = new_project(client, "fuzz")
    yield project, project.upload(chat_jsonl)


def _post(project: ProjectCtx, path: str, body: Any) -> None:
    raw = json.dumps(body).encode()  # Infinity and NaN as Python writes them
    response = project.client.post(
        path, content=raw, headers={**project.headers, "content-type": "application/json"}
    )
    assert response.status_code < 500, (body, response.status_code, response.text)
    if response.status_code == 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error


@pytest.mark.slow
def test_job_create_bodies_never_500(fuzz_project: tuple[ProjectCtx, str]) -> None:
    project, file_id = fuzz_project

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(job_bodies(file_id))
    def check(body: dict[str, Any]) -> None:
        _post(project, "/v1/fine_tuning/jobs", body)

    check()


@pytest.mark.slow
def test_estimate_bodies_never_500(fuzz_project: tuple[ProjectCtx, str]) -> None:
    project, _ = fuzz_project

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(ESTIMATE_BODIES)
    def check(body: dict[str, Any]) -> None:
        _post(project, "/v1/fine_tuning/estimates", body)

    check()
