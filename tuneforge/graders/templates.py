"""OpenAI's grader templates: `{{sample.output_text}}`, `{{sample.output_json.a.b}}`,
`{{item.a.b}}` (a numeric segment indexes a list). A string value is inserted as it is, any other
value as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

#: Past this many characters, a rendered template is refused (`truncated_observation_error`): a
#: short template repeating a large item could otherwise fill memory.
MAX_RENDERED_CHARS = 1_000_000
PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_PATH = re.compile(r"^(sample|item)(?:\.[^.\s{}]+)*$")


class TemplateError(Exception):
    """A reference that cannot be filled; `kind` names the field of the run's `metadata.errors`
    that it sets (`invalid_variable_error` or `sample_parse_error`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_template(text: str) -> str | None:
    """Why `text` is not a valid template, or None."""
    for match in PLACEHOLDER.finditer(text):
        if not _PATH.match(match.group(1)):
            return (
                f"{match.group(0)!r} is not a reference: use {{{{sample.output_text}}}}, "
                "{{sample.output_json.<field>}} or {{item.<field>}}."
            )
    return None


@dataclass
class Namespaces:
    """What templates read: the model's sample (text, and JSON when it parses) and the item."""

    model_sample: str
    item: Any = None
    _json: Any = field(default=None, init=False)
    _json_error: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        try:
            self._json = json.loads(self.model_sample)
        except (ValueError, RecursionError) as exc:
            self._json_error = str(exc)

    def sample_json(self) -> Any:
        """The sample parsed as JSON, or None when it is not JSON."""
        return self._json if self._json_error is None else None

    def lookup(self, path: str) -> Any:
        namespace, *rest = path.split(".")
        if namespace == "item":
            return _walk(self.item, rest, path)
        if rest[:1] == ["output_text"] and len(rest) == 1:
            return self.model_sample
        if rest[:1] == ["output_json"]:
            if self._json_error is not None:
                raise TemplateError(
                    "sample_parse_error", f"The sample is not valid JSON: {self._json_error}."
                )
            return _walk(self._json, rest[1:], path)
        raise TemplateError("invalid_variable_error", f"{path!r}: the sample has no such field here.")

    def render(self, text: str, limit: int = MAX_RENDERED_CHARS) -> str:
        """`text` with its references filled; a TemplateError when one cannot be filled or when
        the result would be longer than `limit` characters."""
        size = len(text)

        def fill(match: re.Match[str]) -> str:
            nonlocal size
            value = self.lookup(match.group(1))
            filled = value if isinstance(value, str) else _as_json(value)
            size += len(filled) - len(match.group(0))
            if size > limit:
                raise TemplateError("truncated_observation_error", f"The text is over {limit} characters.")
            return filled

        rendered = PLACEHOLDER.sub(fill, text)
        if len(rendered) > limit:
            raise TemplateError("truncated_observation_error", f"The text is over {limit} characters.")
        return rendered


def _walk(value: Any, segments: list[str], path: str) -> Any:
    for segment in segments:
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif (
            isinstance(value, list) and segment.isascii() and segment.isdigit() and int(segment) < len(value)
        ):
            value = value[int(segment)]
        else:
            raise TemplateError("invalid_variable_error", f"{path!r} does not exist.")
    return value


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError) as exc:
        raise TemplateError("other_error", f"The value cannot be written as JSON: {exc}.") from exc
