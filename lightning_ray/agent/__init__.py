"""What agents import (through `import lightning_ray as lr`), and what rollout runners use to host them.

Agent side: `rollout`, `LitAgent`, `LLM`, `emit_reward`, `ToolError`.
Runner side: `load_agent`, `call_agent`, `open_reward_sink`, `rollout_reward`, `coerce_reward`.
"""

from lightning_ray.agent.api import (
    AgentLoadError,
    LitAgent,
    LoadedAgent,
    ToolError,
    call_agent,
    is_async_callable,
    load_agent,
    rollout,
)
from lightning_ray.agent.llm import LLM
from lightning_ray.agent.rewards import (
    EmittedReward,
    RewardSink,
    coerce_reward,
    current_reward_sink,
    emit_reward,
    install_thread_propagation,
    open_reward_sink,
    rollout_reward,
)

__all__ = [
    "LLM",
    "AgentLoadError",
    "EmittedReward",
    "LitAgent",
    "LoadedAgent",
    "RewardSink",
    "ToolError",
    "call_agent",
    "coerce_reward",
    "current_reward_sink",
    "emit_reward",
    "install_thread_propagation",
    "is_async_callable",
    "load_agent",
    "open_reward_sink",
    "rollout",
    "rollout_reward",
]
