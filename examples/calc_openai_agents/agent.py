"""The calculator task with the OpenAI Agents SDK: `Agent` + `Runner` + `function_tool`, unmodified.

The SDK's own loop calls the model, runs the tool and feeds its result back. The only lightning-ray code is
the `@lr.rollout` entry: it points the SDK's chat-completions model at `llm.base_url` and scores the answer.
Train it with `lightning-ray train configs/calc_openai_agents.yaml`.
"""

from __future__ import annotations

from agents import (
    Agent,
    MaxTurnsExceeded,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    ToolCallItem,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

import lightning_ray as lr
from examples.calc.reward import shaped_reward
from examples.calc.tool import run_tool

INSTRUCTIONS = (
    "Solve the math word problem. Use the calculator tool for arithmetic. "
    "Finish with the final number inside <answer></answer>, e.g. <answer>84</answer>."
)
MAX_TURNS = 4

set_tracing_disabled(True)  # no trace export: nothing leaves the machine


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * 7 + 3'."""
    return run_tool(expression)


def build_agent(client: AsyncOpenAI, llm: lr.LLM) -> Agent:
    return Agent(
        name="calculator",
        instructions=INSTRUCTIONS,
        tools=[calculator],
        model=OpenAIChatCompletionsModel(model=llm.model, openai_client=client),
        model_settings=ModelSettings(temperature=llm.temperature, top_p=llm.top_p, max_tokens=llm.max_tokens),
    )


@lr.rollout
async def calc_agent(task: dict, llm: lr.LLM) -> float:
    """1.0 for the right `<answer>`; else partial credit for answer format and calculator use (`shaped_reward`,
    as in examples/calc); 0.0 when the agent runs out of turns."""
    client = AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key)
    async with client:
        try:
            result = await Runner.run(build_agent(client, llm), task["question"], max_turns=MAX_TURNS)
        except MaxTurnsExceeded:
            return 0.0
    tool_calls = sum(isinstance(item, ToolCallItem) for item in result.new_items)
    return shaped_reward(str(result.final_output or ""), float(task["answer"]), tool_calls)
