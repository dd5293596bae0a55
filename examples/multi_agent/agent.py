"""Two agents in one rollout: a solver (with the calculator tool) and a checker that reviews its answer.

Both are ordinary OpenAI Agents SDK agents. Each gets its own client on the rollout's endpoint for its role,
`llm.for_agent("solver")` / `llm.for_agent("checker")`, so the gateway records every call under the role that
made it; nothing inside the framework changes. `rollout.train_agents` in the config picks whose calls train,
and `rollout.frozen_agents` which untrained roles are served by a frozen snapshot of the starting policy (a second
inference deployment that never receives the new weights). `configs/multi_agent.yaml` trains the solver and
freezes the checker, so the judge of each answer does not drift as the solver learns; without `frozen_agents`
an untrained role runs on the current, trained policy.

Credit: the rollout's reward (the checker's final answer, scored like the calc example) goes to every trained
call (see `lightning_ray/data/merge.py`).
"""

from __future__ import annotations

from agents import (
    Agent,
    MaxTurnsExceeded,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

import lightning_ray as lr
from examples.calc.reward import answer_reward
from examples.calc.tool import run_tool

SOLVER = (
    "Solve the math word problem. Use the calculator tool for arithmetic. "
    "Finish with the final number inside <answer></answer>, e.g. <answer>84</answer>."
)
CHECKER = (
    "You check a solution to a math word problem. If it is right, repeat its final number; if it is wrong, "
    "give the right one. Reply only with <answer>NUMBER</answer>."
)
MAX_TURNS = 4

set_tracing_disabled(True)


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * 7 + 3'."""
    return run_tool(expression)


def agent_for(llm: lr.LLM, name: str, instructions: str, tools: list) -> tuple[Agent, AsyncOpenAI]:
    """An agent whose calls the gateway records under role `name` (its route)."""
    client = AsyncOpenAI(base_url=llm.for_agent(name).base_url, api_key=llm.api_key)
    settings = ModelSettings(temperature=llm.temperature, top_p=llm.top_p, max_tokens=llm.max_tokens)
    model = OpenAIChatCompletionsModel(model=llm.model, openai_client=client)
    return Agent(
        name=name, instructions=instructions, tools=tools, model=model, model_settings=settings
    ), client


@lr.rollout
async def solve_and_check(task: dict, llm: lr.LLM) -> float:
    """1.0 when the checker's final `<answer>` is right, else 0.0."""
    solver, solver_client = agent_for(llm, "solver", SOLVER, [calculator])
    checker, checker_client = agent_for(llm, "checker", CHECKER, [])
    async with solver_client, checker_client:
        try:
            solution = await Runner.run(solver, task["question"], max_turns=MAX_TURNS)
        except MaxTurnsExceeded:
            return 0.0
        review = f"Problem: {task['question']}\nSolution: {solution.final_output}"
        verdict = await Runner.run(checker, review, max_turns=1)
    return answer_reward(str(verdict.final_output or ""), float(task["answer"]))
