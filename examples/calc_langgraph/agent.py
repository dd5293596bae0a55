"""The calculator task with LangGraph's prebuilt ReAct agent over `langchain_openai.ChatOpenAI`, unmodified.

The graph's own loop calls the model, runs the tool and feeds its result back. The only lightning-ray code is
the `@lr.rollout` entry: it points `ChatOpenAI` at `llm.base_url` and scores the answer. For a 135M model the
input messages start with two worked examples (an `AIMessage` with a tool call, its `ToolMessage`, then the answer;
`examples/calc/worked_examples.py`): from the instruction alone it never calls the tool.
Train it with `lightning-ray train configs/calc_langgraph.yaml`.
"""

from __future__ import annotations

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.errors import GraphRecursionError
from langgraph.prebuilt import create_react_agent

import lightning_ray as lr
from examples.calc.reward import shaped_reward
from examples.calc.tool import run_tool
from examples.calc.worked_examples import WORKED_EXAMPLES

INSTRUCTIONS = (
    "Solve the math word problem. Use the calculator tool for arithmetic. "
    "Finish with the final number inside <answer></answer>, e.g. <answer>84</answer>."
)
RECURSION_LIMIT = 8  # graph steps: each model call and each tool run is one


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * 7 + 3'."""
    return run_tool(expression)


def worked_example_messages() -> list[AnyMessage]:
    """The worked examples as the message history the graph starts from, before the task's question."""
    messages: list[AnyMessage] = []
    for ex in WORKED_EXAMPLES:
        call = {"name": "calculator", "args": {"expression": ex.expression}, "id": ex.call_id}
        messages += [
            HumanMessage(ex.question),
            AIMessage(ex.lead_in, tool_calls=[call]),
            ToolMessage(ex.tool_result, tool_call_id=ex.call_id),
            AIMessage(ex.final_reply),
        ]
    return messages


def build_agent(llm: lr.LLM):
    model = ChatOpenAI(
        model=llm.model,
        base_url=llm.base_url,
        api_key=llm.api_key,
        temperature=llm.temperature,
        top_p=llm.top_p,
        max_tokens=llm.max_tokens,
        max_retries=0,
    )
    return create_react_agent(model, [calculator], prompt=INSTRUCTIONS)


@lr.rollout
async def calc_agent(task: dict, llm: lr.LLM) -> float:
    """1.0 for the right `<answer>`; else partial credit for answer format and calculator use (`shaped_reward`,
    as in examples/calc); 0.0 when the graph hits its recursion limit."""
    examples = worked_example_messages()
    try:
        state = await build_agent(llm).ainvoke(
            {"messages": [*examples, HumanMessage(task["question"])]},
            config={"recursion_limit": RECURSION_LIMIT},
        )
    except GraphRecursionError:
        return 0.0
    new_messages = state["messages"][len(examples) + 1 :]
    tool_calls = sum(len(getattr(m, "tool_calls", None) or []) for m in new_messages)
    return shaped_reward(str(state["messages"][-1].content), float(task["answer"]), tool_calls)
