"""lightning-ray: train unmodified AI agents with GRPO on Ray.

Agents import only this module: `import lightning_ray as lr`, then `@lr.rollout`, `lr.LitAgent`, `lr.LLM`,
`lr.emit_reward`, `lr.ToolError`; `lr.RemoteRunner` runs an agent for a train run elsewhere (remote runners).
Importing it stays cheap (no Ray, torch or vLLM) so agent modules load fast.
"""

from lightning_ray.agent import LLM, LitAgent, ToolError, emit_reward, rollout

__version__ = "0.1.0"

__all__ = ["LLM", "LitAgent", "RemoteRunner", "ToolError", "__version__", "emit_reward", "rollout"]


def __getattr__(name: str):
    # `lr.RemoteRunner(url, token).run(agent)`: imported when asked, so agent modules still load fast.
    if name == "RemoteRunner":
        from lightning_ray.runners.client import RemoteRunner

        return RemoteRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
