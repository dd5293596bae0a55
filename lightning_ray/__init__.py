"""lightning-ray: train unmodified AI agents with GRPO on Ray.

Agents import only this module: `import lightning_ray as lr`, then `@lr.rollout`, `lr.LitAgent`, `lr.LLM`,
`lr.emit_reward`, `lr.ToolError`. Importing it stays cheap (no Ray, torch or vLLM) so agent modules load fast.
"""

from lightning_ray.agent import LLM, LitAgent, ToolError, emit_reward, rollout

__version__ = "0.1.0"

__all__ = ["LLM", "LitAgent", "ToolError", "__version__", "emit_reward", "rollout"]
