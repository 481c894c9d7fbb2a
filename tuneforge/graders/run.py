"""Running a grader on one model sample and dataset item: the answer of OpenAI's
`/fine_tuning/alpha/graders/run` (`reward`, `metadata`, `sub_rewards`, ...).

A reference a template cannot fill, a formula that fails on the sub-rewards, a python grader that
fails or a model grader whose call fails is not a 400: the reward is 0 and `metadata.errors` says
why, as OpenAI answers. Graders this service cannot run (`python` unless the administrator enables
it, `score_model` and `label_model` without a configured model endpoint, the `cosine` metric)
raise `GraderUnavailable` before anything runs. What may run is a `GraderRuntime`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tuneforge.graders import model as model_graders
from tuneforge.graders.metrics import MAX_SIMILARITY_CHARS, UNAVAILABLE_METRICS, similarity
from tuneforge.graders.model import ModelEndpoint
from tuneforge.graders.sandbox import SandboxLimits, run_python_grader
from tuneforge.graders.schema import (
    Grader,
    GraderError,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    SubGrader,
    TextSimilarityGrader,
)
from tuneforge.graders.templates import Namespaces, TemplateError

if TYPE_CHECKING:
    from tuneforge.config import Settings

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


class GraderUnavailable(GraderError):
    """A valid grader this service cannot run as configured."""


@dataclass(frozen=True)
class GraderRuntime:
    """What graders may use besides pure computation: `python` runs only with sandbox limits
    (the administrator enabled it), model graders only with an endpoint."""

    python: SandboxLimits | None = None
    model_endpoint: ModelEndpoint | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> GraderRuntime:
        python = None
        if settings.python_grader_enabled:
            python = SandboxLimits(settings.python_grader_timeout_seconds, settings.python_grader_memory_mb)
        endpoint = None
        if settings.grader_model_url:
            key = settings.grader_model_key.get_secret_value() if settings.grader_model_key else None
            endpoint = ModelEndpoint(settings.grader_model_url, key, settings.grader_model_timeout_seconds)
        return cls(python, endpoint)


@dataclass
class _Outcome:
    reward: float = 0.0
    errors: dict[str, bool] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    sub_rewards: dict[str, float] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)  # per grader model
    sampled_model: str | None = None


def ensure_runnable(
    grader: Grader | SubGrader, runtime: GraderRuntime | None = None, param: str = "grader"
) -> None:
    runtime = runtime or GraderRuntime()
    if isinstance(grader, PythonGrader) and runtime.python is None:
        raise GraderUnavailable(
            f"'{param}.type' 'python': python graders are turned off on this service (an "
            "administrator turns them on with TUNEFORGE_PYTHON_GRADER_ENABLED=true).",
            f"{param}.type",
        )
    if isinstance(grader, ScoreModelGrader | LabelModelGrader) and runtime.model_endpoint is None:
        raise GraderUnavailable(
            f"'{param}.type' {grader.type!r}: model graders need a grader model endpoint, which this "
            "service has not configured (an administrator sets TUNEFORGE_GRADER_MODEL_URL).",
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
            ensure_runnable(sub, runtime, f"{param}.{grader.sub_param(key)}")


def run_grader(
    grader: Grader, model_sample: str, item: Any = None, runtime: GraderRuntime | None = None
) -> dict[str, Any]:
    runtime = runtime or GraderRuntime()
    ensure_runnable(grader, runtime)
    started = time.perf_counter()
    outcome = _run(grader, Namespaces(model_sample, item), runtime)
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
            "token_usage": _total_usage(outcome.usage) if outcome.usage else None,
            "sampled_model_name": outcome.sampled_model,
        },
        "sub_rewards": outcome.sub_rewards,
        "model_grader_token_usage_per_model": outcome.usage,
    }


def _total_usage(per_model: dict[str, dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for usage in per_model.values():
        for key, value in usage.items():
            total[key] = total.get(key, 0) + value
    return total


def _run(grader: Grader | LabelModelGrader, namespaces: Namespaces, runtime: GraderRuntime) -> _Outcome:
    if isinstance(grader, MultiGrader):
        return _run_multi(grader, namespaces, runtime)
    try:
        if isinstance(grader, StringCheckGrader):
            return _Outcome(reward=_string_check(grader, namespaces))
        if isinstance(grader, PythonGrader):
            assert runtime.python is not None  # ensure_runnable
            return _run_python(grader, namespaces, runtime.python)
        if isinstance(grader, ScoreModelGrader | LabelModelGrader):
            assert runtime.model_endpoint is not None  # ensure_runnable
            return _run_model(grader, namespaces, runtime.model_endpoint)
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


def _run_python(grader: PythonGrader, namespaces: Namespaces, limits: SandboxLimits) -> _Outcome:
    """OpenAI's `sample` for python graders: `output_text`, `output_json` (None unless it parses)."""
    sample = {"output_text": namespaces.model_sample, "output_json": namespaces.sample_json()}
    result = run_python_grader(grader.source, sample, namespaces.item, limits)
    if result.server_error is not None:
        return _Outcome(
            errors={"python_grader_server_error": True},
            details={"python_grader_server_error_type": result.server_error},
        )
    if result.error is not None:
        errors = {"python_grader_runtime_error": True}
        if result.timed_out:
            errors["unresponsive_reward_error"] = True
        return _Outcome(errors=errors, details={"python_grader_runtime_error_details": result.error})
    assert result.reward is not None
    return _Outcome(reward=result.reward)


def _run_model(
    grader: ScoreModelGrader | LabelModelGrader, namespaces: Namespaces, endpoint: ModelEndpoint
) -> _Outcome:
    if isinstance(grader, ScoreModelGrader):
        verdict = model_graders.score(grader, namespaces, endpoint)
    else:
        verdict = model_graders.label(grader, namespaces, endpoint)
    usage = {grader.model: verdict.usage} if verdict.usage else {}
    return _Outcome(
        reward=verdict.reward,
        errors=verdict.errors,
        details=verdict.details,
        usage=usage,
        sampled_model=verdict.model,
    )


def _run_multi(grader: MultiGrader, namespaces: Namespaces, runtime: GraderRuntime) -> _Outcome:
    outcome = _Outcome()
    for key, sub in grader.graders.items():
        result = _run(sub, namespaces, runtime)
        outcome.sub_rewards[key] = result.reward
        outcome.errors.update({flag: True for flag, on in result.errors.items() if on})
        outcome.details.update(result.details)
        for model, usage in result.usage.items():
            merged = outcome.usage.setdefault(model, {})
            for name, value in usage.items():
                merged[name] = merged.get(name, 0) + value
        outcome.sampled_model = outcome.sampled_model or result.sampled_model
    try:
        outcome.reward = grader.formula.evaluate(outcome.sub_rewards)
    except (ArithmeticError, ValueError):
        outcome.errors["other_error"] = True
        outcome.reward = 0.0
    return outcome
