"""The prompt: one system rule plus one worked demo turn, in plain chat messages.

SmolLM2-135M-Instruct almost never follows a bare instruction to use tags; a short rule followed by one
complete demo exchange (question -> ``<calc>`` -> tool result -> ``<answer>``) lets it copy the pattern.
Each question repeats a one-line reminder of the first step, which raised tool use and format compliance
at T=1 in ``check_prompt.py`` runs. Tool results come back as ``user`` messages: the model's chat template
knows no ``tool`` role.
"""

from __future__ import annotations

SYSTEM_RULE = (
    "You solve math word problems with a calculator. "
    "First write the calculation as <calc>expression</calc>. "
    "You will get the result. Then write the final number as <answer>number</answer>."
)
REMINDER = "Reply with only <calc>expression</calc>."


def question_message(question: str) -> str:
    """How a task's question is put to the model."""
    return f"Question: {question}\n{REMINDER}"


DEMO: list[dict[str, str]] = [
    {
        "role": "user",
        "content": question_message(
            "Kate has 15 shells. Kate finds 27 more shells. How many shells does Kate have now?"
        ),
    },
    {"role": "assistant", "content": "<calc>15+27</calc>"},
    {"role": "user", "content": "Result: 42"},
    {"role": "assistant", "content": "<answer>42</answer>"},
]


def initial_messages(question: str) -> list[dict[str, str]]:
    """The conversation the agent opens with: system rule, demo turn, then the task's question."""
    return [
        {"role": "system", "content": SYSTEM_RULE},
        *DEMO,
        {"role": "user", "content": question_message(question)},
    ]
