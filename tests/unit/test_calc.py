"""The calc example's pure parts: tool, reward, protocol (turn handling) and dataset."""

from __future__ import annotations

import json

import pytest

from examples.calc import make_dataset
from examples.calc.prompt import DEMO, SYSTEM_RULE, initial_messages
from examples.calc.protocol import (
    MAX_TOOL_CALLS,
    Action,
    handle_reply,
    parse_reply,
    record_reply,
    start_episode,
)
from examples.calc.reward import answer_reward, extract_answer, parse_number
from examples.calc.tool import MAX_ABS, MAX_EXPONENT, CalcError, evaluate, format_number, run_tool

# --- tool ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("12*7", 84),
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("-(3 + 4) * 2", -14),
        ("+5 - -2", 7),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** 10", 1024),
        ("2 ** -2", 0.25),
        ("1.5 * 4", 6.0),
        ("2^3", 8),
        ("12 × 7 =", 84),
        ("84 ÷ 7", 12.0),
        ("9 − 4", 5),
    ],
)
def test_evaluate_computes(expr: str, expected: float) -> None:
    result = evaluate(expr)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("x + 1", "names are not allowed: 'x'"),
        ("__import__('os')", "function calls are not allowed"),
        ("abs(-3)", "function calls are not allowed"),
        ("(1).real", "attribute access is not allowed"),
        ("2 ** 1000", f"exponent 1000 is too large (limit {MAX_EXPONENT})"),
        ("9 ** 9 ** 9", "exponent 387420489 is too large"),
        ("10 ** 15 * 10", "result too large"),
        ("1e308 * 10", "result too large"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("'a' * 3", "only numbers are allowed"),
        ("True + 1", "only numbers are allowed"),
        ("1 < 2", "Compare is not allowed"),
        ("[1, 2]", "List is not allowed"),
        ("1 & 3", "operator BitAnd is not allowed"),
        ("12 x 7", "invalid syntax"),
        ("", "empty expression"),
        ("1+" * 150 + "1", "longer than 200 characters"),
    ],
)
def test_evaluate_rejects_with_clear_error(expr: str, message: str) -> None:
    with pytest.raises(CalcError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate(expr)


def test_bounds_hold_at_the_limits() -> None:
    assert evaluate(f"2 ** {MAX_EXPONENT}") == 2**MAX_EXPONENT
    assert evaluate(str(MAX_ABS)) == MAX_ABS
    with pytest.raises(CalcError):
        evaluate(str(MAX_ABS + 1))


def test_format_number_and_run_tool() -> None:
    assert format_number(84) == "84"
    assert format_number(12.0) == "12"
    assert format_number(3.5) == "3.5"
    assert format_number(10 / 3) == "3.333333"
    assert run_tool("12*7") == "Result: 84"
    assert run_tool("1/0") == "Error: division by zero"
    assert run_tool("apples") == "Error: names are not allowed: 'apples'"


# --- reward ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected", "reward"),
    [
        ("<answer>84</answer>", 84, 1.0),
        ("So the total is <answer> 84 </answer>.", 84, 1.0),
        ("<answer>84.0</answer>", 84, 1.0),
        ("<answer>+84</answer>", 84, 1.0),
        ("<answer>1,200</answer>", 1200, 1.0),
        ("<answer>-3</answer>", -3, 1.0),
        ("<answer>3.333333</answer>", 10 / 3, 1.0),
        ("<answer>.5</answer>", 0.5, 1.0),
        ("<answer>84</answer> <answer>85</answer>", 84, 1.0),
        ("<answer>85</answer> <answer>84</answer>", 84, 0.0),
        ("<answer>84.5</answer>", 84, 0.0),
        ("<answer>3.33</answer>", 10 / 3, 0.0),
        ("<answer>84 pens</answer>", 84, 0.0),
        ("<answer>$84</answer>", 84, 0.0),
        ("<answer>12*7</answer>", 84, 0.0),
        ("<answer>8 + 3 = 11</answer>", 11, 0.0),
        ("<answer>1,20</answer>", 120, 0.0),
        ("<answer></answer>", 0, 0.0),
        ("<answer>84", 84, 0.0),
        ("The answer is 84.", 84, 0.0),
        ("", 84, 0.0),
    ],
)
def test_answer_reward(reply: str, expected: float, reward: float) -> None:
    assert answer_reward(reply, expected) == reward


def test_extract_and_parse_answer() -> None:
    assert extract_answer("a <answer>\n 7 \n</answer> b") == "7"
    assert extract_answer("no tags") is None
    assert parse_number("1,234.5") == 1234.5
    assert parse_number("seven") is None
    assert parse_number("1e3") is None
    assert parse_number("nan") is None


# --- protocol: parsing and turn handling -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "action"),
    [
        ("<calc>12*7</calc>", Action("calc", "12*7")),
        ("Let me compute. <calc> 3 + 4 </calc> then answer", Action("calc", "3 + 4")),
        ("<calc>5+3", Action("calc", "5+3")),
        ("<calc>5+3\nmore text", Action("calc", "5+3")),
        ("<calc>2*3</calc> and <calc>9</calc>", Action("calc", "2*3")),
        ("<answer>84</answer>", Action("answer", "84")),
        ("<calc>12*7</calc> = 84 so <answer>84</answer>", Action("answer", "84")),
        ("<answer>84 pens</answer>", Action("answer", "84 pens")),
        ("The answer is 84.", Action("none")),
        ("<calc></calc>", Action("none")),
        ("<answer>84", Action("none")),
        ("", Action("none")),
    ],
)
def test_parse_reply(reply: str, action: Action) -> None:
    assert parse_reply(reply) == action


def test_handle_reply_runs_the_tool_while_budget_lasts() -> None:
    turn = handle_reply("<calc>12*7</calc>", tool_calls_left=1)
    assert not turn.done and turn.feedback == "Result: 84"
    turn = handle_reply("<calc>12*x</calc>", tool_calls_left=1)
    assert not turn.done and turn.feedback == "Error: names are not allowed: 'x'"
    turn = handle_reply("<calc>12*7</calc>", tool_calls_left=0)
    assert turn.done and turn.feedback is None and turn.action.kind == "calc"


@pytest.mark.parametrize("reply", ["<answer>84</answer>", "I think it is 84."])
def test_handle_reply_ends_on_answer_or_no_action(reply: str) -> None:
    turn = handle_reply(reply, tool_calls_left=MAX_TOOL_CALLS)
    assert turn.done and turn.feedback is None


def test_record_reply_builds_the_conversation() -> None:
    episode = start_episode("Tom has 5 apples. Tom gets 3 more apples. How many apples does Tom have now?")
    opening = len(episode.messages)
    assert not record_reply(episode, "<calc>5+3</calc>")
    assert episode.messages[opening:] == [
        {"role": "assistant", "content": "<calc>5+3</calc>"},
        {"role": "user", "content": "Result: 8"},
    ]
    assert record_reply(episode, "<answer>8</answer>")
    assert episode.final_reply == "<answer>8</answer>" and episode.ended_by == "answer"
    assert episode.tool_calls == 1 and episode.messages[-1]["role"] == "assistant"
    assert answer_reward(episode.final_reply, 8) == 1.0


def test_record_reply_stops_after_the_tool_budget() -> None:
    episode = start_episode("q")
    results = [record_reply(episode, "<calc>1+1</calc>") for _ in range(MAX_TOOL_CALLS + 1)]
    assert results == [False] * MAX_TOOL_CALLS + [True]
    assert episode.ended_by == "tool_budget" and episode.tool_calls == MAX_TOOL_CALLS
    assert answer_reward(episode.final_reply, 2) == 0.0


def test_record_reply_ends_without_an_action() -> None:
    episode = start_episode("q")
    assert record_reply(episode, "It is 8.")
    assert episode.ended_by == "no_action" and episode.tool_calls == 0


def test_prompt_is_rule_then_worked_demos_then_question() -> None:
    messages = initial_messages("How many?")
    assert messages[0] == {"role": "system", "content": SYSTEM_RULE}
    assert messages[1:-1] == DEMO
    assert messages[-1]["role"] == "user" and messages[-1]["content"].startswith("How many?")
    assert len(DEMO) % 4 == 0
    for i in range(0, len(DEMO), 4):
        calc, result, answer = DEMO[i + 1]["content"], DEMO[i + 2]["content"], DEMO[i + 3]["content"]
        assert run_tool(parse_reply(calc).text) == result
        assert parse_reply(answer).kind == "answer"
        assert answer_reward(answer, float(result.removeprefix("Result: "))) == 1.0


# --- dataset ---------------------------------------------------------------------------------------------


def _read(split: str) -> list[dict]:
    path = make_dataset.DATA_DIR / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataset_is_deterministic_and_matches_committed_files() -> None:
    first, second = make_dataset.generate(), make_dataset.generate()
    assert first == second
    assert make_dataset.generate(seed=7) != first
    assert _read("train") == first["train"] and _read("val") == first["val"]


def test_dataset_splits_are_disjoint_and_well_formed() -> None:
    data = make_dataset.generate()
    train, val = data["train"], data["val"]
    assert (len(train), len(val)) == (2000, 100)
    train_questions, val_questions = {r["question"] for r in train}, {r["question"] for r in val}
    assert len(train_questions) == len(train) and len(val_questions) == len(val)
    assert not train_questions & val_questions
    assert len({r["id"] for r in train + val}) == len(train) + len(val)
    for row in train + val:
        assert set(row) == {"id", "question", "answer", "level"}
        assert isinstance(row["answer"], int) and row["answer"] >= 0
        assert row["question"].endswith("?")


def test_dataset_is_graded_by_level() -> None:
    val = make_dataset.generate()["val"]
    counts = {level: sum(r["level"] == level for r in val) for level in (1, 2, 3, 4)}
    assert counts == make_dataset.level_counts(100) == {1: 30, 2: 25, 3: 25, 4: 20}
    assert all(r["answer"] <= 18 for r in val if r["level"] == 1)


def test_generated_answers_follow_from_the_questions() -> None:
    """Every answer is reproducible from the numbers in its question with the tool itself."""
    for row in make_dataset.generate(n_train=200, n_val=20)["train"]:
        numbers = [
            int(tok) for tok in row["question"].replace(".", " ").replace("?", " ").split() if tok.isdigit()
        ]
        assert numbers, row
        assert any(evaluate(expr) == row["answer"] for expr in _candidate_expressions(numbers)), row


def _candidate_expressions(n: list[int]) -> list[str]:
    if len(n) == 2:
        a, b = n
        return [f"{a}+{b}", f"{a}-{b}", f"{a}*{b}", f"{a}//{b}"]
    a, b, c = n
    return [f"{a}*{b}-{c}", f"{a}*{b}+{c}", f"{a}-{b}*{c}", f"({a}+{b})//{c}"]


def test_shaped_reward_gives_format_credit_only_to_a_plain_number():
    from examples.calc.reward import FORMAT_CREDIT, TOOL_CREDIT, shaped_reward

    assert shaped_reward("<answer>84</answer>", 84) == 1.0
    assert shaped_reward("<answer>84</answer>", 84, tool_calls=1) == 1.0
    assert shaped_reward("<answer>83</answer>", 84) == FORMAT_CREDIT
    assert shaped_reward("<answer>83</answer>", 84, tool_calls=2) == FORMAT_CREDIT + TOOL_CREDIT
    assert shaped_reward("<answer>12*7</answer>", 84, tool_calls=1) == TOOL_CREDIT
    assert shaped_reward("84", 84) == 0.0
