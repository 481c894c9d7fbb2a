"""The graders OpenAI's fine-tuning API takes, as pydantic models in OpenAI's shapes, and
`parse_grader`, which validates a client's JSON into one of them or raises `GraderError` with
`param` the dotted path of the offending field (`grader.operation`, `grader.graders.a.type`)."""

from __future__ import annotations

import ast
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tuneforge.graders.formula import Formula, FormulaError
from tuneforge.graders.templates import check_template


class GraderError(ValueError):
    """A grader the service refuses (400): `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Grader(_Shape):
    name: str = Field(min_length=1, max_length=256)


class StringCheckGrader(_Grader):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


TextSimilarityMetric = Literal[
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
]


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: TextSimilarityMetric


class PythonGrader(_Grader):
    type: Literal["python"]
    source: str = Field(min_length=1)
    image_tag: str | None = None

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, source: str) -> str:
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            raise ValueError(f"source does not parse: {getattr(exc, 'msg', exc)}") from exc
        if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
            raise ValueError("source must define a function grade(sample, item)")
        return source


class ModelInput(_Shape):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | dict[str, Any] | list[str | dict[str, Any]]
    type: Literal["message"] | None = None


class SamplingParams(_Shape):
    max_completions_tokens: int | None = Field(None, ge=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)


class ScoreModelGrader(_Grader):
    type: Literal["score_model"]
    model: str = Field(min_length=1)
    input: list[ModelInput] = Field(min_length=1)
    range: list[float] | None = Field(None, min_length=2, max_length=2)
    sampling_params: SamplingParams | None = None

    @field_validator("range")
    @classmethod
    def _increasing_range(cls, range: list[float] | None) -> list[float] | None:
        if range is not None and not range[0] < range[1]:
            raise ValueError("range must be [low, high] with low < high")
        return range


class LabelModelGrader(_Grader):
    type: Literal["label_model"]
    model: str = Field(min_length=1)
    input: list[ModelInput] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)

    @field_validator("passing_labels")
    @classmethod
    def _passing_subset(cls, passing: list[str], info: ValidationInfo) -> list[str]:
        unknown = [label for label in passing if label not in info.data.get("labels", [])]
        if unknown:
            raise ValueError(f"passing_labels must be among labels; not: {', '.join(unknown)}")
        return passing


SubGrader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader


class MultiGrader(_Grader):
    """`graders` maps a name (used in `calculate_output`) to a grader, as OpenAI's guide shows; a
    single grader object (as the SDK's type has it) is taken too, named by its `name`."""

    type: Literal["multi"]
    calculate_output: str
    graders: dict[str, SubGrader]
    _formula: Formula = PrivateAttr()
    _single: bool = PrivateAttr(default=False)

    @property
    def formula(self) -> Formula:
        return self._formula

    def sub_param(self, key: str) -> str:
        """The dotted path (below `grader`) of a sub-grader as the client wrote it."""
        return "graders" if self._single else f"graders.{key}"


Grader = StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | MultiGrader

_TOP: dict[str, type[_Grader]] = {
    "string_check": StringCheckGrader,
    "text_similarity": TextSimilarityGrader,
    "python": PythonGrader,
    "score_model": ScoreModelGrader,
    "multi": MultiGrader,
}
_SUB: dict[str, type[_Grader]] = {
    "string_check": StringCheckGrader,
    "text_similarity": TextSimilarityGrader,
    "python": PythonGrader,
    "score_model": ScoreModelGrader,
    "label_model": LabelModelGrader,
}
_TEMPLATED = ("input", "reference")
MAX_SUB_GRADERS = 20


def parse_grader(data: object, param: str = "grader") -> Grader:
    grader = _parse(data, param, _TOP)
    assert not isinstance(grader, LabelModelGrader)
    return grader


def _parse(data: object, param: str, kinds: dict[str, type[_Grader]]) -> Grader | LabelModelGrader:
    if not isinstance(data, dict):
        raise GraderError(f"'{param}' must be a grader object.", param)
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in kinds:
        expected = ", ".join(kinds)
        where = "" if kinds is _TOP else " inside a multi grader"
        raise GraderError(
            f"Invalid value for '{param}.type': {kind!r}; expected one of {expected}{where}.", f"{param}.type"
        )
    if kind == "multi":
        return _parse_multi(data, param)
    model = kinds[kind]
    try:
        grader = model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation(exc, param) from None
    for field_name in _TEMPLATED:
        text = getattr(grader, field_name, None)
        problem = check_template(text) if isinstance(text, str) else None
        if problem:
            raise GraderError(f"Invalid value for '{param}.{field_name}': {problem}", f"{param}.{field_name}")
    assert isinstance(grader, Grader | LabelModelGrader)
    return grader


def _parse_multi(data: dict[str, Any], param: str) -> MultiGrader:
    raw = data.get("graders")
    single = isinstance(raw, dict) and isinstance(raw.get("type"), str)
    subs: dict[str, SubGrader] = {}
    if single:
        sub = _parse(raw, f"{param}.graders", _SUB)
        assert not isinstance(sub, MultiGrader)
        subs[sub.name] = sub
    elif isinstance(raw, dict) and len(raw) > MAX_SUB_GRADERS:
        raise GraderError(f"A multi grader takes at most {MAX_SUB_GRADERS} graders.", f"{param}.graders")
    elif isinstance(raw, dict) and raw:
        for key, value in raw.items():
            sub = _parse(value, f"{param}.graders.{key}", _SUB)
            assert not isinstance(sub, MultiGrader)
            subs[key] = sub
    else:
        raise GraderError(
            f"'{param}.graders' must be an object mapping names to graders.", f"{param}.graders"
        )
    try:
        grader = MultiGrader.model_validate({**data, "graders": {}})
    except ValidationError as exc:
        raise _from_validation(exc, param) from None
    grader.graders = subs
    grader._single = single
    try:
        grader._formula = Formula(grader.calculate_output, subs)
    except FormulaError as exc:
        raise GraderError(
            f"Invalid value for '{param}.calculate_output': {exc}", f"{param}.calculate_output"
        ) from exc
    return grader


def _from_validation(exc: ValidationError, param: str) -> GraderError:
    error = exc.errors()[0]
    path = ".".join([param, *_loc(error.get("loc", ()))])
    detail = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if error.get("type") == "missing":
        return GraderError(f"Missing required parameter: '{path}'.", path)
    if error.get("type") == "extra_forbidden":
        return GraderError(f"Unrecognized grader argument supplied: '{path}'.", path)
    return GraderError(f"Invalid value for '{path}': {detail}.", path)


def _loc(loc: tuple[int | str, ...]) -> list[str]:
    """Field names and list indexes, without the tags pydantic gives union members."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            if parts:
                parts[-1] += f"[{part}]"
        elif "[" not in part and part not in {"str", "int", "float", "bool", "dict", "list", "none"}:
            parts.append(part)
    return parts
