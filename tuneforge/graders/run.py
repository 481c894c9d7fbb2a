"""Running a grader on one model sample and dataset item: the answer of OpenAI's
`/fine_tuning/alpha/graders/run` (`reward`, `metadata`, `sub_rewards`, ...).

A reference a template cannot fill, or a formula that fails on the sub-rewards, is not a 400:
the reward is 0 and `metadata.errors` says why, as OpenAI answers. Graders this service cannot run
(`python`, `score_model`, `label_model`, the `meteor` and `cosine` metrics) raise
`GraderUnavailable` before anything runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tuneforge.graders.metrics import MAX_SIMILARITY_CHARS, UNAVAILABLE_METRICS, similarity
from tuneforge.graders.schema import (
    Grader,
    GraderError,
    LabelModelGrader,
    MultiGrader,
    StringCheckGrader,
    SubGrader,
    TextSimilarityGrader,
)
from tuneforge.graders.templates import Namespaces, TemplateError

ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
ERROR_DETAILS = (
    "model_grader_server_error_details",
    "python_grader_runtime_error_details",
    "python_grader_server_error_type",
)
NOT_RUN_HERE = ("python", "score_model", "label_model")


class GraderUnavailable(GraderError):
    """A valid grader this service cannot run (yet)."""


@dataclass
class _Outcome:
    reward: float = 0.0
    errors: dict[str, bool] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    sub_rewards: dict[str, float] = field(default_factory=dict)


def ensure_runnable(grader: Grader | SubGrader, param: str = "grader") -> None:
    if grader.type in NOT_RUN_HERE:
        raise GraderUnavailable(
            f"'{param}.type' {grader.type!r}: this grader type is not available on this service yet.",
            f"{param}.type",
        )
    if isinstance(grader, TextSimilarityGrader) and grader.evaluation_metric in UNAVAILABLE_METRICS:
        why = UNAVAILABLE_METRICS[grader.evaluation_metric]
        raise GraderUnavailable(
            f"'{param}.evaluation_metric' {grader.evaluation_metric!r} is not available on this "
            f"service: {why}.",
            f"{param}.evaluation_metric",
        )
    if isinstance(grader, MultiGrader):
        for key, sub in grader.graders.items():
            ensure_runnable(sub, f"{param}.{grader.sub_param(key)}")


def run_grader(grader: Grader, model_sample: str, item: Any = None) -> dict[str, Any]:
    ensure_runnable(grader)
    started = time.perf_counter()
    outcome = _run(grader, Namespaces(model_sample, item))
    errors: dict[str, Any] = {flag: outcome.errors.get(flag, False) for flag in ERROR_FLAGS}
    errors.update({name: outcome.details.get(name) for name in ERROR_DETAILS})
    return {
        "reward": outcome.reward,
        "metadata": {
            "name": grader.name,
            "type": grader.type,
            "errors": errors,
            "execution_time": time.perf_counter() - started,
            "scores": dict(outcome.sub_rewards),
            "token_usage": None,
            "sampled_model_name": None,
        },
        "sub_rewards": outcome.sub_rewards,
        "model_grader_token_usage_per_model": {},
    }


def _run(grader: Grader | LabelModelGrader, namespaces: Namespaces) -> _Outcome:
    if isinstance(grader, MultiGrader):
        return _run_multi(grader, namespaces)
    try:
        if isinstance(grader, StringCheckGrader):
            return _Outcome(reward=_string_check(grader, namespaces))
        assert isinstance(grader, TextSimilarityGrader), grader.type  # ensure_runnable refused the rest
        output = namespaces.render(grader.input, MAX_SIMILARITY_CHARS)
        reference = namespaces.render(grader.reference, MAX_SIMILARITY_CHARS)
        return _Outcome(reward=similarity(grader.evaluation_metric, output, reference))
    except TemplateError as exc:
        return _Outcome(errors={exc.kind: True})


def _string_check(grader: StringCheckGrader, namespaces: Namespaces) -> float:
    output, reference = namespaces.render(grader.input), namespaces.render(grader.reference)
    if grader.operation == "eq":
        passed = output == reference
    elif grader.operation == "ne":
        passed = output != reference
    elif grader.operation == "like":
        passed = reference in output
    else:
        passed = reference.casefold() in output.casefold()
    return 1.0 if passed else 0.0


def _run_multi(grader: MultiGrader, namespaces: Namespaces) -> _Outcome:
    outcome = _Outcome()
    for key, sub in grader.graders.items():
        result = _run(sub, namespaces)
        outcome.sub_rewards[key] = result.reward
        outcome.errors.update({flag: True for flag, on in result.errors.items() if on})
    try:
        outcome.reward = grader.formula.evaluate(outcome.sub_rewards)
    except (ArithmeticError, ValueError):
        outcome.errors["other_error"] = True
        outcome.reward = 0.0
    return outcome
