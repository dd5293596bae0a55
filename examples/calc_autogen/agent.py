"""The calculator task with AutoGen AgentChat: `AssistantAgent` over `OpenAIChatCompletionClient`, unmodified.

The agent's own loop calls the model, runs the tool and (with `reflect_on_tool_use`) asks the model to answer
from the tool's result. The only lightning-ray code is the `@lr.rollout` entry: it points the model client at
`llm.base_url` and scores the answer. For a 135M model the agent's model context starts with two worked examples
(a `FunctionCall`, its `FunctionExecutionResult`, then the answer; `examples/calc/worked_examples.py`): from the
instruction alone it never calls the tool. Train it with `lightning-ray train configs/calc_autogen.yaml`.
"""

from __future__ import annotations

import json

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallRequestEvent
from autogen_core import FunctionCall
from autogen_core.model_context import UnboundedChatCompletionContext
from autogen_core.models import (
    AssistantMessage,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    ModelInfo,
    UserMessage,
)
from autogen_ext.models.openai import OpenAIChatCompletionClient

import lightning_ray as lr
from examples.calc.reward import shaped_reward
from examples.calc.tool import run_tool
from examples.calc.worked_examples import WORKED_EXAMPLES

INSTRUCTIONS = (
    "Solve the math word problem. Use the calculator tool for arithmetic. "
    "Finish with the final number inside <answer></answer>, e.g. <answer>84</answer>."
)
MAX_TOOL_ITERATIONS = 3
# AutoGen cannot look up a model it does not know; this describes the served model.
MODEL_INFO = ModelInfo(
    vision=False, function_calling=True, json_output=False, family="unknown", structured_output=False
)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * 7 + 3'."""
    return run_tool(expression)


def worked_example_messages() -> list[LLMMessage]:
    """The worked examples as the model context the agent starts from, before the task."""
    messages: list[LLMMessage] = []
    for ex in WORKED_EXAMPLES:
        call = FunctionCall(
            id=ex.call_id, name="calculator", arguments=json.dumps({"expression": ex.expression})
        )
        result = FunctionExecutionResult(content=ex.tool_result, name="calculator", call_id=ex.call_id)
        messages += [
            UserMessage(content=ex.question, source="user"),
            AssistantMessage(content=[call], thought=ex.lead_in, source="calculator"),
            FunctionExecutionResultMessage(content=[result]),
            AssistantMessage(content=ex.final_reply, source="calculator"),
        ]
    return messages


def build_client(llm: lr.LLM) -> OpenAIChatCompletionClient:
    return OpenAIChatCompletionClient(
        model=llm.model,
        base_url=llm.base_url,
        api_key=llm.api_key,
        model_info=MODEL_INFO,
        temperature=llm.temperature,
        top_p=llm.top_p,
        max_tokens=llm.max_tokens,
        max_retries=0,
    )


@lr.rollout
async def calc_agent(task: dict, llm: lr.LLM) -> float:
    """1.0 for the right `<answer>`; else partial credit for answer format and calculator use (`shaped_reward`,
    as in examples/calc)."""
    client = build_client(llm)
    agent = AssistantAgent(
        "calculator",
        model_client=client,
        tools=[calculator],
        system_message=INSTRUCTIONS,
        model_context=UnboundedChatCompletionContext(initial_messages=worked_example_messages()),
        reflect_on_tool_use=True,
        max_tool_iterations=MAX_TOOL_ITERATIONS,
    )
    try:
        result = await agent.run(task=task["question"])
    finally:
        await client.close()
    tool_calls = sum(len(m.content) for m in result.messages if isinstance(m, ToolCallRequestEvent))
    return shaped_reward(str(result.messages[-1].content), float(task["answer"]), tool_calls)
