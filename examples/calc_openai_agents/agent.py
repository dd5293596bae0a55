"""The calculator task with the OpenAI Agents SDK: `Agent` + `Runner` + `function_tool`, unmodified.

The SDK's own loop calls the model, runs the tool and feeds its result back. The only lightning-ray code is
the `@lr.rollout` entry: it points the SDK's chat-completions model at `llm.base_url` and scores the answer.
For a 135M model the run's input starts with two worked examples as SDK input items (a function call and its
output, then the answer; `examples/calc/worked_examples.py`): from the instruction alone it never calls the tool.
Train it with `lightning-ray train configs/calc_openai_agents.yaml`.
"""

from __future__ import annotations

import json

from agents import (
    Agent,
    MaxTurnsExceeded,
    ModelBehaviorError,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    ToolCallItem,
    TResponseInputItem,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

import lightning_ray as lr
from examples.calc.reward import shaped_reward
from examples.calc.tool import run_tool
from examples.calc.worked_examples import WORKED_EXAMPLES

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


def worked_example_items() -> list[TResponseInputItem]:
    """The worked examples as the conversation history the SDK sends before the task's question."""
    items: list[TResponseInputItem] = []
    for ex in WORKED_EXAMPLES:
        arguments = json.dumps({"expression": ex.expression})
        items += [
            {"role": "user", "content": ex.question},
            {
                "type": "message",
                "role": "assistant",
                "id": f"msg-{ex.call_id}",
                "status": "completed",
                "content": [{"type": "output_text", "text": ex.lead_in, "annotations": []}],
            },
            {"type": "function_call", "call_id": ex.call_id, "name": "calculator", "arguments": arguments},
            {"type": "function_call_output", "call_id": ex.call_id, "output": ex.tool_result},
            {"role": "assistant", "content": ex.final_reply},
        ]
    return items


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
    as in examples/calc); 0.0 when the agent runs out of turns or calls a tool it does not have."""
    client = AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key)
    async with client:
        try:
            question = {"role": "user", "content": task["question"]}
            result = await Runner.run(
                build_agent(client, llm), [*worked_example_items(), question], max_turns=MAX_TURNS
            )
        except (MaxTurnsExceeded, ModelBehaviorError):  # out of turns; a call to a tool that does not exist
            return 0.0
    tool_calls = sum(isinstance(item, ToolCallItem) for item in result.new_items)
    return shaped_reward(str(result.final_output or ""), float(task["answer"]), tool_calls)
