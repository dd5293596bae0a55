"""The prompt: one system rule plus two worked demo exchanges, in plain chat messages.

SmolLM2-135M-Instruct almost never follows a bare instruction to use tags; a short rule followed by complete
demo exchanges (question -> ``<calc>`` -> tool result -> ``<answer>``) lets it copy the pattern. There are two,
a multiplication and an addition: with a single multiplication demo, training taught the model to copy the
demo's ``*`` into every problem (every sample of a group then earns the same format and tool credit, and the
groups carry no signal).
Tool results come back as ``user`` messages: the model's chat template knows no ``tool`` role.
"""

from __future__ import annotations

SYSTEM_RULE = (
    "You solve math word problems with a calculator. "
    "First write the calculation as <calc>expression</calc>. "
    "You will get the result. Then write the final number as <answer>number</answer>."
)

DEMO: list[dict[str, str]] = [
    {"role": "user", "content": "Lily has 12 boxes. Each box has 7 pens. How many pens does Lily have?"},
    {"role": "assistant", "content": "<calc>12*7</calc>"},
    {"role": "user", "content": "Result: 84"},
    {"role": "assistant", "content": "<answer>84</answer>"},
    {
        "role": "user",
        "content": "Sam has 25 marbles and Leo has 18 marbles. How many marbles do they have together?",
    },
    {"role": "assistant", "content": "<calc>25+18</calc>"},
    {"role": "user", "content": "Result: 43"},
    {"role": "assistant", "content": "<answer>43</answer>"},
]


def initial_messages(question: str, system: str = SYSTEM_RULE) -> list[dict[str, str]]:
    """The conversation the agent opens with: system rule, demo exchanges, then the task's question."""
    return [{"role": "system", "content": system}, *DEMO, {"role": "user", "content": question}]
