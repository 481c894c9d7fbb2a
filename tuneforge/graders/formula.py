"""A multi grader's `calculate_output`: arithmetic over the sub-graders' rewards, parsed with `ast`
and evaluated by walking the tree (never `eval`).

Allowed: numbers, the sub-graders' names, `+ - * / // % **`, unary `+ -`, parentheses and the
functions in `FUNCTIONS`. Every value is a float, so `**` cannot build a huge integer."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Iterable, Mapping

MAX_FORMULA_CHARS = 2000


def _round(value: float, digits: float = 0) -> float:
    return float(round(value, int(digits)))


FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": lambda *args: float(min(args)),
    "max": lambda *args: float(max(args)),
    "abs": lambda value: float(abs(value)),
    "floor": lambda value: float(math.floor(value)),
    "ceil": lambda value: float(math.ceil(value)),
    "round": _round,
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": math.log,
}

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: math.pow,  # a negative base with a fractional power is a ValueError, not a complex
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class FormulaError(ValueError):
    """The formula does not parse, or uses something other than arithmetic over known names."""


class Formula:
    """A parsed, checked formula; `evaluate` raises ArithmeticError or ValueError on a bad value
    (division by zero, overflow, a math domain error)."""

    def __init__(self, source: str, names: Iterable[str]) -> None:
        if len(source) > MAX_FORMULA_CHARS:
            raise FormulaError(f"The formula is longer than {MAX_FORMULA_CHARS} characters.")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            raise FormulaError(f"The formula does not parse: {getattr(exc, 'msg', exc)}.") from exc
        self.source = source
        self.names = frozenset(names)
        try:
            self._check(tree.body)
        except RecursionError as exc:
            raise FormulaError("The formula is nested too deeply.") from exc
        self._tree = tree.body

    def _check(self, node: ast.expr) -> None:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise FormulaError(f"Only numbers may appear as constants, not {node.value!r}.")
        elif isinstance(node, ast.Name):
            if node.id not in self.names:
                known = ", ".join(sorted(self.names)) or "none"
                raise FormulaError(f"Unknown name {node.id!r} (the graders are: {known}).")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise FormulaError(f"The operator {type(node.op).__name__} is not allowed.")
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                raise FormulaError(f"The operator {type(node.op).__name__} is not allowed.")
            self._check(node.operand)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise FormulaError(f"Only these functions may be called: {', '.join(FUNCTIONS)}.")
            if node.keywords or not node.args or any(isinstance(a, ast.Starred) for a in node.args):
                raise FormulaError(f"{node.func.id}() takes positional arguments only.")
            for argument in node.args:
                self._check(argument)
        else:
            raise FormulaError(f"{type(node).__name__} is not allowed in a formula.")

    def evaluate(self, values: Mapping[str, float]) -> float:
        result = self._evaluate(self._tree, values)
        if not math.isfinite(result):
            raise ArithmeticError("The formula's result is not a finite number.")
        return result

    def _evaluate(self, node: ast.expr, values: Mapping[str, float]) -> float:
        if isinstance(node, ast.Constant):
            assert isinstance(node.value, int | float)
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.BinOp):
            left, right = self._evaluate(node.left, values), self._evaluate(node.right, values)
            return float(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._evaluate(node.operand, values))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        try:
            return float(FUNCTIONS[node.func.id](*(self._evaluate(a, values) for a in node.args)))
        except TypeError as exc:  # a wrong argument count
            raise ValueError(str(exc)) from exc
