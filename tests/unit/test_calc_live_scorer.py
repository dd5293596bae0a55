"""The live demo's scorer (examples/calc/live_scorer.py) on prompts rendered as the gateway renders them."""

from __future__ import annotations

import json

import pytest

from examples.calc.live_scorer import DATA, score, task_answer
from examples.calc.prompt import initial_messages
from examples.calc.reward import FORMAT_CREDIT, TOOL_CREDIT
from lightning_ray.models import builtin_tokenizer_dir


def first_task(split: str) -> dict:
    with (DATA / f"{split}.jsonl").open() as f:
        return json.loads(f.readline())


@pytest.fixture(scope="module")
def rendered():
    """The prompt text of the demo user's request for a task: SmolLM2's chat template over the calc prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir())

    def render(question: str) -> str:
        return tokenizer.apply_chat_template(
            initial_messages(question), tokenize=False, add_generation_prompt=True
        )

    return render


def test_finds_the_task_after_the_worked_examples(rendered):
    train, val = first_task("train"), first_task("val")
    assert task_answer(rendered(train["question"])) == train["answer"]
    assert task_answer(rendered(val["question"])) == val["answer"]
    assert task_answer(val["question"]) == val["answer"]  # the question alone (the demo's held-out check)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("<calc>8*8+10</calc>", 1.0),  # a calculator call that computes the answer
        ("<calc>8 × 8 + 10", 1.0),  # unclosed, the calculator's spelling
        ("<answer>74</answer>", 1.0),
        ("<answer>74.0</answer> <calc>1+1</calc>", 1.0),  # an answer wins over a call
        ("<calc>8*8</calc>", TOOL_CREDIT),  # computes, wrong
        ("<answer>64</answer>", FORMAT_CREDIT),  # a plain number, wrong
        ("<calc>__import__('os')</calc>", 0.0),  # never evaluated
        ("<answer>74 apples</answer>", 0.0),
        ("Max has 74 apples.", 0.0),
        ("", 0.0),
    ],
)
def test_first_move_reward(rendered, reply, expected):
    task = first_task("train")
    assert (
        task["answer"] == 74
    )  # "Max buys 8 packs of apples with 8 in each pack. Noah gives Max 10 more ..."
    assert score(rendered(task["question"]), reply) == expected


def test_a_prompt_without_a_known_question_is_refused():
    with pytest.raises(ValueError, match="no question of .*train,val"):
        score("What is 2 + 2?", "<answer>4</answer>")
