"""What a grader reads from the item: every `{{item.<path>}}` in its templates, and the keys a
python grader's `grade(sample, item)` reads as `item["key"]` whatever the item holds. Each is named
with the grader field it comes from (`reference`, `graders.exact.input[0].content`, `source`), so a
job whose data lacks one can be refused with a 400 at that field.

A python grader's reads are found only where they are certain: `item["key"]` with a literal string
key in a top-level statement of `grade` before its first `if`, loop, `try`, `with` or `return`
(a read after one may be guarded) and outside conditional expressions (`a if c else b`, `and`,
`or`, comprehensions, lambdas). `item.get(...)`, computed keys, reads in helper functions and
reads after the item is rebound are not detectable; a missing key there costs the sample its
reward at training time (a grader failure), as any failing grader does.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tuneforge.graders.templates import PLACEHOLDER

_CONDITIONAL = (ast.IfExp, ast.BoolOp, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_SIMPLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return)
_INERT = (ast.Import, ast.ImportFrom, ast.Pass, ast.Global, ast.Nonlocal)
#: Grader fields that are never rendered as templates.
_NOT_TEMPLATES = frozenset(
    {"type", "name", "operation", "evaluation_metric", "calculate_output", "model", "role", "labels",
     "passing_labels", "range", "sampling_params", "image_tag", "pass_threshold"}
)  # fmt: skip


@dataclass(frozen=True)
class ItemReference:
    """One thing a grader reads from the item: `segments` below `item` (`("answer", "0")` for
    `{{item.answer.0}}`, one segment for a python grader's `item["answer"]`), and `param`, the
    dotted path of the grader field that reads it."""

    segments: tuple[str, ...]
    param: str

    @property
    def key(self) -> str:
        """The top-level field of the line that the reference needs."""
        return self.segments[0]

    @property
    def text(self) -> str:
        """As the user wrote it: `{{item.answer}}` or `item["answer"]`."""
        if self.param.endswith("source"):
            return f"item[{self.segments[0]!r}]"
        return "{{item." + ".".join(self.segments) + "}}"


def item_references(grader: Any) -> list[ItemReference]:
    """What `grader` (a grader object as the client wrote it) reads from the item, in order, each
    reference once."""
    found: list[ItemReference] = []
    for reference in _walk(grader, ""):
        if reference not in found:
            found.append(reference)
    return found


def _walk(value: Any, where: str) -> Iterator[ItemReference]:
    if isinstance(value, str):
        for match in PLACEHOLDER.finditer(value):
            namespace, _, rest = match.group(1).partition(".")
            if namespace == "item" and rest:
                yield ItemReference(tuple(rest.split(".")), where)
    elif isinstance(value, dict):
        if value.get("type") == "python" and isinstance(value.get("source"), str):
            param = _join(where, "source")
            for key in python_item_keys(value["source"]):
                yield ItemReference((key,), param)
        for name, inner in value.items():
            if name not in _NOT_TEMPLATES and (name != "source" or value.get("type") != "python"):
                yield from _walk(inner, _join(where, str(name)))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _walk(inner, f"{where}[{index}]")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def python_item_keys(source: str) -> list[str]:
    """The keys `grade(sample, item)` certainly reads as `item["key"]` (see the module's doc)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return []
    grade = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "grade"), None)
    if grade is None or len(grade.args.args) < 2:
        return []
    item = grade.args.args[1].arg
    keys: list[str] = []
    for statement in grade.body:
        if isinstance(statement, _INERT):
            continue
        if not isinstance(statement, _SIMPLE):
            break
        for key in _unconditional_reads(statement, item):
            if key not in keys:
                keys.append(key)
        if isinstance(statement, ast.Return) or _rebinds(statement, item):
            break
    return keys


def _unconditional_reads(node: ast.AST, item: str) -> Iterator[str]:
    if isinstance(node, _CONDITIONAL):
        return
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.ctx, ast.Load)
        and isinstance(node.value, ast.Name)
        and node.value.id == item
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, str)
    ):
        yield node.slice.value
    for child in ast.iter_child_nodes(node):
        yield from _unconditional_reads(child, item)


def _rebinds(statement: ast.stmt, item: str) -> bool:
    return any(
        isinstance(node, ast.Name) and node.id == item and isinstance(node.ctx, ast.Store | ast.Del)
        for node in ast.walk(statement)
    )
