"""How the trajectory browser shows recorded calls: chat turns decoded from the prompt ids (SmolLM2's real
tokenizer), the turns new since the role's previous call, tool calls and results, per-token log-probs; and a
GRPO group's advantages as the run's algorithm computes them."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from lightning_ray.config import load_config
from lightning_ray.gateway.render import encode, load_tokenizer
from lightning_ray.models import builtin_tokenizer_dir
from lightning_ray.view.calls import call_views, group_rows


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(builtin_tokenizer_dir())


def chat(*turns: tuple[str, str]) -> str:
    return (
        "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"
    )


def call_row(tokenizer, index: int, prompt: str, response: str) -> dict:
    response_ids = encode(tokenizer, response)
    return {
        "call_index": index,
        "agent": "solver",
        "prompt_ids": encode(tokenizer, prompt),
        "response_ids": response_ids,
        "response_logprobs": [-0.01 * (i + 1) for i in range(len(response_ids))],
        "response_versions": [3] * len(response_ids),
        "policy_version": 3,
        "response_text": response,
    }


def test_turns_new_turns_tool_calls_and_results(tokenizer):
    first_answer = '<tool_call>\n{"name": "calc", "arguments": {"expr": "6*7"}}\n</tool_call>'
    prompt1 = chat(("system", "Use the calculator."), ("user", "What is 6*7?"))
    prompt2 = (
        prompt1 + first_answer + "<|im_end|>\n" + chat(("user", "<tool_response>\n42\n</tool_response>"))
    )
    rows = [
        call_row(tokenizer, 0, prompt1, first_answer),
        call_row(tokenizer, 1, prompt2, "<answer>42</answer>"),
    ]
    first, second = call_views(rows, tokenizer)

    assert [(t.role, t.new) for t in first.turns] == [("system", True), ("user", True), ("assistant", True)]
    assert first.tool_calls == ['{"name": "calc", "arguments": {"expr": "6*7"}}']
    # the second prompt repeats the first call: only the tool result turn (and the open assistant turn) are new
    assert [(t.role, t.new) for t in second.turns] == [
        ("system", False),
        ("user", False),
        ("assistant", False),
        ("user", True),
        ("assistant", True),
    ]
    assert second.turns[3].tool_results == ["42"]
    assert "".join(t.text for t in second.tokens) == "<answer>42</answer>"
    assert second.tokens[0].shade == pytest.approx(1 - math.exp(-0.01), abs=1e-3)
    assert second.versions == "3"


def test_without_a_tokenizer_prompts_show_as_ids(tokenizer):
    [view] = call_views([call_row(tokenizer, 0, chat(("user", "hi")), "hello")], None)
    assert view.turns[0].role == "prompt ids" and view.tokens[0].text.startswith("[")


def test_group_rows_carry_the_algorithms_advantages():
    calls = pa.table(
        {
            "rollout_id": ["a", "b", "c", "d"],
            "group_id": ["g"] * 4,
            "call_index": [0] * 4,
            "reward": [1.0, 0.0, 0.0, 1.0],
            "call_reward": pa.array([None] * 4, pa.float64()),
            "response_text": ["yes", "no", "no", "yes"],
        }
    )
    members = [{"rollout_id": r, "reward": v} for r, v in zip("abcd", [1.0, 0.0, 0.0, 1.0], strict=True)]
    rows = group_rows(calls, load_config(None, check_files=False), members)
    assert [r["rollout_id"] for r in rows[:2]] == ["a", "d"]  # best first
    adv = {r["rollout_id"]: r["advantages"] for r in rows}
    assert adv["a"] == adv["d"] and adv["b"] == adv["c"] and len(adv["a"]) == 1
    assert adv["a"][0] > 0 and adv["b"][0] == pytest.approx(-adv["a"][0])  # GRPO: (r - mean) / std
    assert group_rows(calls, None, members)[0]["advantages"] == []  # no config: not made up
