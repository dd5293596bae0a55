"""The calculator task with AutoGen AgentChat: `AssistantAgent` over `OpenAIChatCompletionClient`, unmodified.

The agent's own loop calls the model, runs the tool and (with `reflect_on_tool_use`) asks the model to answer
from the tool's result. The only lightning-ray code is the `@lr.rollout` entry: it points the model client at
`llm.base_url` and scores the answer. Train it with `lightning-ray train configs/calc_autogen.yaml`.
"""

from __future__ import annotations

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallRequestEvent
from autogen_core.models import ModelInfo
from autogen_ext.models.openai import OpenAIChatCompletionClient

import lightning_ray as lr
from examples.calc.reward import shaped_reward
from examples.calc.tool import run_tool

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
        reflect_on_tool_use=True,
        max_tool_iterations=MAX_TOOL_ITERATIONS,
    )
    try:
        result = await agent.run(task=task["question"])
    finally:
        await client.close()
    tool_calls = sum(len(m.content) for m in result.messages if isinstance(m, ToolCallRequestEvent))
    return shaped_reward(str(result.messages[-1].content), float(task["answer"]), tool_calls)
