"""Beam search over prompt texts by critique-and-rewrite steps ("textual gradients").

The method of ProTeGi (Pryzant et al., "Automatic Prompt Optimization with 'Gradient Descent' and Beam Search",
EMNLP 2023) as Agent Lightning's APO runs it (microsoft/agent-lightning, `agentlightning.algorithm.apo`): each
round, every prompt of the beam runs a minibatch of tasks; a critic reads the failures and writes what is wrong
with the prompt (the gradient); an editor rewrites the prompt along it (the step). Every new prompt is scored
on held-out tasks and the best `beam_width` of the old and new ones form the next beam.

The search here is the algorithm only: `expand` (minibatch, critique, rewrites) and `score` are functions, so it
runs the same on the rollout stack (`lightning_ray.optimize.run`) and on a plain Python scorer in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Node:
    """One candidate prompt of the search tree: where it came from and what it scored."""

    id: int
    text: str
    parent: int | None  # None: the starting prompt
    round: int
    critique: str | None = None  # what the critic said about the parent's failures
    score: float | None = None  # on the validation tasks; None while unscored (or past the budget)
    details: dict[str, Any] | None = None  # the scorer's other numbers (success rate, failures)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Edit:
    """What one expansion of a beam prompt produced: the critique and the rewrites along it."""

    critique: str
    rewrites: list[str]


Score = Callable[[str], tuple[float, dict[str, Any]]]  # prompt text -> (score, details)
Expand = Callable[[Node], Edit]


def beam_search(
    root: str,
    score: Score,
    expand: Expand,
    *,
    beam_width: int,
    rounds: int,
    budget: int | None = None,
    on_node: Callable[[Node], None] = lambda node: None,
) -> list[Node]:
    """Every node the search made, in order (`nodes[0]` is `root`); the best is `best(nodes)`.

    A rewrite identical to a prompt already in the tree, or empty, is not scored again. Once `budget` prompts
    are scored the search stops expanding. `on_node` sees each node once it is scored (to write it out as the
    search goes)."""
    nodes: list[Node] = []
    seen: set[str] = set()

    def spent() -> bool:
        return budget is not None and len(nodes) >= budget

    def add(text: str, parent: int | None, rnd: int, critique: str | None) -> Node | None:
        text = text.strip()
        if not text or text in seen or spent():
            return None
        seen.add(text)
        node = Node(len(nodes), text, parent, rnd, critique)
        node.score, node.details = score(text)
        nodes.append(node)
        on_node(node)
        return node

    first = add(root, None, 0, None)
    if first is None:
        raise ValueError("beam_search: the starting prompt is empty")
    beam = [first]
    for rnd in range(1, rounds + 1):
        new = []
        for parent in beam:
            if spent():  # no minibatch or editor call for rewrites that could not be scored
                break
            edit = expand(parent)
            new += [n for text in edit.rewrites if (n := add(text, parent.id, rnd, edit.critique))]
        if not new:
            break
        beam = ranked(beam + new)[:beam_width]
    return nodes


def ranked(nodes: list[Node]) -> list[Node]:
    """Best score first; among equal scores the earlier node (the simpler, already-trusted prompt) first."""
    return sorted(nodes, key=lambda n: (-(n.score if n.score is not None else float("-inf")), n.id))


def best(nodes: list[Node]) -> Node:
    return ranked(nodes)[0]
