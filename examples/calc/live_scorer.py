"""The live demo's reward (`benchmarks/live_demo.py`): one function rewards the scripted user's answers and the
live gateway's extra samples (`live.scorer: examples.calc.live_scorer:score`), and decides held-out success.

The demo is single-turn: the policy answers a calc question once, and that reply is its first move in the calc
protocol (`examples.calc.protocol.parse_reply`; an answer wins over a call in the same reply):

* 1.0 when the move gives the task's answer: `<answer>N</answer>` with N right (`examples.calc.reward`'s strict
  format and tolerance), or a `<calc>` expression that the calculator (`examples.calc.tool.evaluate`, never
  `eval`) computes to it;
* otherwise partial credit for the format, as `examples.calc.reward.shaped_reward` gives it: TOOL_CREDIT for a
  calculator call whose expression computes, FORMAT_CREDIT for an answer that is a plain number, 0 for neither.

The task is found by its question: the question of examples/calc/data/{train,val}.jsonl that ends last in the
prompt (the rendered chat also holds the worked examples before it). A prompt without a known question is a
`ValueError` (the live gateway then fails that sample as `bad_reward`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from examples.calc.protocol import parse_reply
from examples.calc.reward import FORMAT_CREDIT, TOOL_CREDIT, is_correct, parse_number
from examples.calc.tool import CalcError, evaluate

DATA = Path(__file__).parent / "data"
SPLITS = ("train.jsonl", "val.jsonl")


@functools.cache
def answers() -> dict[str, float]:
    """Question text -> answer, over the train and val splits."""
    out: dict[str, float] = {}
    for name in SPLITS:
        with (DATA / name).open() as f:
            for line in f:
                if line.strip():
                    task = json.loads(line)
                    out[task["question"]] = float(task["answer"])
    return out


def task_answer(prompt: str) -> float:
    """The answer of the dataset question that ends last in `prompt`."""
    found = [(prompt.rfind(q) + len(q), len(q), q) for q in answers() if q in prompt]
    if not found:
        raise ValueError(f"no question of {DATA}/{{train,val}}.jsonl in the prompt: ...{prompt[-120:]!r}")
    return answers()[max(found)[2]]


def first_move_reward(reply: str, expected: float) -> float:
    """1.0 when the reply's first move gives `expected`, else the format credit (see the module docstring)."""
    move = parse_reply(reply)
    if move.kind == "answer":
        value = parse_number(move.text)
        if value is None:
            return 0.0
        return 1.0 if is_correct(value, expected) else FORMAT_CREDIT
    if move.kind == "calc":
        try:
            value = float(evaluate(move.text))
        except CalcError:
            return 0.0
        return 1.0 if is_correct(value, expected) else TOOL_CREDIT
    return 0.0


def score(prompt: str, completion: str) -> float:
    """`live.scorer`: the reward of `completion` for the task whose question is in `prompt`."""
    return first_move_reward(completion, task_answer(prompt))
