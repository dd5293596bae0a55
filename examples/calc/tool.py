"""The calculator tool: a safe arithmetic evaluator built on ``ast``, never ``eval``.

Allowed: int and float literals, ``+ - * / // % **``, unary ``+``/``-`` and parentheses. Every literal and
every intermediate result must stay within ``MAX_ABS`` and exponents within ``MAX_EXPONENT``, so no input
can make the tool slow or its output huge. Anything else (names, calls, attributes, comparisons, strings,
complex results) raises :class:`CalcError` with a message the model can read.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

Number = int | float

MAX_EXPR_CHARS = 200
MAX_EXPONENT = 32
MAX_ABS = 10**15

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# Symbols a model may write for the same operations.
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**"}


class CalcError(ValueError):
    """The expression is not allowed or cannot be computed; the message says why."""


def normalize(expr: str) -> str:
    """Map common calculator spellings (``×``, ``÷``, ``−``, ``^``) to Python's and drop a trailing ``=``."""
    for symbol, python in _SPELLINGS.items():
        expr = expr.replace(symbol, python)
    return expr.strip().rstrip("=").strip()


def evaluate(expr: str) -> Number:
    """Compute an arithmetic expression, or raise :class:`CalcError`."""
    text = normalize(expr)
    if not text:
        raise CalcError("empty expression")
    if len(text) > MAX_EXPR_CHARS:
        raise CalcError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalcError(f"invalid syntax: {text!r}") from None
    return _eval_node(tree.body)


def format_number(value: Number) -> str:
    """Render a result the way the model should copy it: integers plainly, other floats to 6 decimals."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def run_tool(expr: str) -> str:
    """The tool's reply to the model: ``Result: 84`` or ``Error: division by zero``."""
    try:
        return f"Result: {format_number(evaluate(expr))}"
    except CalcError as err:
        return f"Error: {err}"


def _eval_node(node: ast.expr) -> Number:
    if isinstance(node, ast.Constant):
        return _check_size(_literal(node.value))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        return _check_size(_apply(node.op, left, right))
    raise CalcError(_describe_rejected(node))


def _literal(value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalcError(f"only numbers are allowed, not {value!r}")
    return value


def _apply(op: ast.operator, left: Number, right: Number) -> Number:
    if isinstance(op, ast.Pow) and abs(right) > MAX_EXPONENT:
        raise CalcError(f"exponent {format_number(right)} is too large (limit {MAX_EXPONENT})")
    try:
        result = _BINARY[type(op)](left, right)
    except ZeroDivisionError:
        raise CalcError("division by zero") from None
    except OverflowError:
        raise CalcError(f"result too large (limit {MAX_ABS:.0e})") from None
    if isinstance(result, complex):
        raise CalcError("result is not a real number")
    return result


def _check_size(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise CalcError("result is not a finite number")
    if abs(value) > MAX_ABS:
        raise CalcError(f"result too large (limit {MAX_ABS:.0e})")
    return value


def _describe_rejected(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return f"names are not allowed: {node.id!r}"
    if isinstance(node, ast.Call):
        return "function calls are not allowed"
    if isinstance(node, ast.Attribute):
        return "attribute access is not allowed"
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        return f"operator {type(node.op).__name__} is not allowed"
    return f"{type(node).__name__} is not allowed; use numbers, + - * / // % ** and parentheses"
