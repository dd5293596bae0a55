"""GRPO-family maths: per-row advantages from Arrow tables and token-level policy losses (pure numpy/torch)."""

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.algorithms.losses import kl_penalty, loss_denominator, policy_loss

__all__ = ["compute_advantages", "kl_penalty", "loss_denominator", "policy_loss"]
