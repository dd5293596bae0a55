"""Scorers for the live-learning tests (`live.scorer`): plain reward functions of (prompt, completion)."""

from __future__ import annotations


def half(prompt: str, completion: str) -> float:
    """0.5 for every sample: a client that posts 0 or 1 always makes its group differ."""
    return 0.5


def broken(prompt: str, completion: str) -> float:
    raise RuntimeError("this scorer always fails")
