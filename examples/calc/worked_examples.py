"""Worked examples for the framework calc agents: two solved problems, each a real calculator tool call.

SmolLM2-135M does not produce a hermes ``<tool_call>`` or an ``<answer>`` tag from a bare instruction (every
reward was 0, so GRPO had no signal). Shown as the conversation history a framework sends (question -> tool
call -> tool result -> ``<answer>``), the examples render through the model's tool template exactly as the
model's own calls will, and it can copy them. The call turn opens with one sentence naming the expression
(``lead_in``): with a bare ``<tool_call>`` the model mostly started its reply with ``<tool_response>`` (1 valid
call in 16 samples at temperature 1); with the sentence, 4 in 12. They are the plain calc agent's two demos (``prompt.DEMO``): a
multiplication and an addition, so training does not teach one operator for every problem. Each framework
agent turns them into its own message types.
"""

from __future__ import annotations

from dataclasses import dataclass

from examples.calc.tool import run_tool


@dataclass(frozen=True)
class WorkedExample:
    """One solved problem: the question, the calculator call's expression, the tool's reply and the answer."""

    question: str
    expression: str
    answer: str

    @property
    def call_id(self) -> str:
        return f"example-{self.answer}"

    @property
    def lead_in(self) -> str:
        """The text before the tool call in the same assistant turn."""
        return f"I use the calculator for {self.expression}."

    @property
    def tool_result(self) -> str:
        return run_tool(self.expression)

    @property
    def final_reply(self) -> str:
        return f"<answer>{self.answer}</answer>"


WORKED_EXAMPLES = (
    WorkedExample("Lily has 12 boxes. Each box has 7 pens. How many pens does Lily have?", "12*7", "84"),
    WorkedExample(
        "Sam has 25 marbles and Leo has 18 marbles. How many marbles do they have together?", "25+18", "43"
    ),
)
