"""Two agents in one rollout: a solver (with the calculator tool) and a checker that reviews its answer.

Both are ordinary OpenAI Agents SDK agents. Each gets its own client on the rollout's endpoint for its role,
`llm.for_agent("solver")` / `llm.for_agent("checker")`, so the gateway records every call under the role that
made it; nothing inside the framework changes. `rollout.train_agents` in the config picks whose calls train,
and `rollout.frozen_agents` which untrained roles are served by a frozen snapshot of the starting policy (a second
inference deployment that never receives the new weights). `configs/multi_agent.yaml` trains the solver and
freezes the checker, so the judge of each answer does not drift as the solver learns; without `frozen_agents`
an untrained role runs on the current, trained policy.

Credit: the rollout's reward goes to every trained call (see `lightning_ray/data/merge.py`): 1.0 when the
checker's final answer is right; otherwise half the solver's own partial credit (`shaped_reward`: a right answer
the checker spoiled, answer format, calculator use), so a 135M solver's first steps toward the protocol count.
Both agents start from worked examples (the solver's as in examples/calc_openai_agents, the checker's one
review), since from bare instructions SmolLM2-135M neither calls the tool nor writes `<answer>` tags.
"""

from __future__ import annotations

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
from examples.calc.reward import answer_reward, shaped_reward
from examples.calc.tool import run_tool
from examples.calc.worked_examples import WORKED_EXAMPLES
from examples.calc_openai_agents.agent import worked_example_items

SOLVER = (
    "Solve the math word problem. Use the calculator tool for arithmetic. "
    "Finish with the final number inside <answer></answer>, e.g. <answer>84</answer>."
)
CHECKER = (
    "You check a solution to a math word problem. If it is right, repeat its final number; if it is wrong, "
    "give the right one. Reply only with <answer>NUMBER</answer>."
)
MAX_TURNS = 4
SOLVER_CREDIT = 0.5  # the solver's partial credit counts half when the checker's answer is wrong

set_tracing_disabled(True)


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * 7 + 3'."""
    return run_tool(expression)


def review(question: str, solution: str) -> str:
    """What the checker is asked to check."""
    return f"Problem: {question}\nSolution: {solution}"


def checker_example_items() -> list[TResponseInputItem]:
    """One worked review: a right solution, its number repeated in the answer format."""
    ex = WORKED_EXAMPLES[0]
    return [
        {"role": "user", "content": review(ex.question, ex.final_reply)},
        {"role": "assistant", "content": ex.final_reply},
    ]


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
    """1.0 when the checker's final `<answer>` is right, else half the solver's `shaped_reward`."""
    solver, solver_client = agent_for(llm, "solver", SOLVER, [calculator])
    checker, checker_client = agent_for(llm, "checker", CHECKER, [])
    async with solver_client, checker_client:
        question = {"role": "user", "content": task["question"]}
        try:
            solution = await Runner.run(solver, [*worked_example_items(), question], max_turns=MAX_TURNS)
        except (MaxTurnsExceeded, ModelBehaviorError):  # out of turns; a call to a tool that does not exist
            return 0.0
        solved = str(solution.final_output or "")
        to_check = {"role": "user", "content": review(task["question"], solved)}
        verdict = await Runner.run(checker, [*checker_example_items(), to_check], max_turns=1)
    expected = float(task["answer"])
    if answer_reward(str(verdict.final_output or ""), expected) == 1.0:
        return 1.0
    tool_calls = sum(isinstance(item, ToolCallItem) for item in solution.new_items)
    return SOLVER_CREDIT * shaped_reward(solved, expected, tool_calls)
