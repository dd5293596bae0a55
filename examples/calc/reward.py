"""Strict answer-format reward: 1.0 for the correct number inside ``<answer>...</answer>``, else 0.0.

Rules, in order:

* The reply must contain an ``<answer>`` tag closed by ``</answer>``; only the first such tag counts.
* Its content, with surrounding whitespace stripped, must be one plain decimal number: an optional sign,
  digits (thousands commas such as ``1,200`` are allowed) and an optional fractional part. Units, words
  or a second number (``84 pens``, ``12*7``, ``$84``) score 0.
* Tolerance: the number counts as correct when ``math.isclose(value, expected, rel_tol=1e-6,
  abs_tol=1e-6)``. So ``84``, ``84.0`` and ``84.000`` all match an expected 84, and a float answer such as
  3.333333 (the tool's 6-decimal rounding of 10/3) matches 10/3; ``84.5`` or ``83`` do not.
"""

from __future__ import annotations

import math
import re

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
REL_TOL = 1e-6
ABS_TOL = 1e-6


def extract_answer(reply: str) -> str | None:
    """The stripped content of the first ``<answer>...</answer>`` tag, or None when there is none."""
    match = ANSWER_TAG.search(reply)
    return match.group(1).strip() if match else None


def parse_number(text: str) -> float | None:
    """The value of ``text`` if it is exactly one plain decimal number, else None."""
    if not PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def is_correct(value: float, expected: float) -> bool:
    """Whether ``value`` equals ``expected`` within the documented tolerance."""
    return math.isclose(value, expected, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def answer_reward(reply: str, expected: float) -> float:
    """1.0 when ``reply`` gives ``expected`` in strict answer format, 0.0 otherwise."""
    content = extract_answer(reply)
    if content is None:
        return 0.0
    value = parse_number(content)
    return 1.0 if value is not None and is_correct(value, expected) else 0.0


FORMAT_CREDIT = 0.1
TOOL_CREDIT = 0.2


def shaped_reward(reply: str, expected: float, tool_calls: int = 0) -> float:
    """The training reward: 1.0 for the correct answer; otherwise partial credit for steps toward it:
    FORMAT_CREDIT for a well-formed ``<answer>number</answer>`` and TOOL_CREDIT for having used the calculator.

    SmolLM2-135M is almost never right at first, so a strict 0/1 reward leaves most GRPO groups without
    variance. The small credits point it at the protocol that produces right answers (compute with the tool,
    then answer in format); held-out success still counts only correct answers (`trainer.success_threshold`).
    """
    content = extract_answer(reply)
    value = parse_number(content) if content is not None else None
    if value is not None and is_correct(value, expected):
        return 1.0
    return (FORMAT_CREDIT if value is not None else 0.0) + (TOOL_CREDIT if tool_calls > 0 else 0.0)
