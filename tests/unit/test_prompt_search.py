"""Prompt optimization's mechanics without Ray: the beam search and successive halving on plain Python scorers,
the editor's messages and parsing, the `optimize` and `prompts` config sections, `llm.prompt`."""

from __future__ import annotations

import pytest

from lightning_ray.agent import LLM
from lightning_ray.cli import parse_args
from lightning_ray.config import ConfigError, load_config
from lightning_ray.optimize.editor import (
    MAX_FAILURES,
    Failure,
    critique_and_rewrite,
    critique_messages,
    parse_rewrite,
)
from lightning_ray.optimize.halving import rung_tasks, successive_halving
from lightning_ray.optimize.run import check_optimize, describe
from lightning_ray.optimize.search import Edit, Node, beam_search, best

WANTED = ("step", "by", "careful", "tags")


def word_score(text: str) -> tuple[float, dict]:
    """A stand-in for validation: the share of the wanted words the prompt holds."""
    words = set(text.split())
    return sum(w in words for w in WANTED) / len(WANTED), {"words": len(words)}


def adding_editor(node: Node) -> Edit:
    """Each rewrite adds one missing wanted word; the critique names them."""
    missing = [w for w in WANTED if w not in node.text.split()]
    return Edit(f"missing {missing}", [f"{node.text} {w}" for w in missing[:2]])


def test_beam_search_climbs_and_records_the_tree():
    seen = []
    nodes = beam_search("Solve it.", word_score, adding_editor, beam_width=2, rounds=3, on_node=seen.append)
    assert seen == nodes and nodes[0].parent is None and nodes[0].score == 0.0
    top = best(nodes)
    assert top.score == 0.75  # three rounds add three words
    chain = []
    node = top
    while node.parent is not None:
        chain.append(node)
        node = nodes[node.parent]
    assert [n.round for n in reversed(chain)] == [1, 2, 3]  # each step's parent is from the round before
    assert all(n.critique.startswith("missing") for n in nodes[1:])
    assert len({n.text for n in nodes}) == len(nodes)  # a rewrite already in the tree is not scored again


def test_beam_search_budget_width_and_a_stuck_editor():
    expanded = []

    def counting_editor(node: Node) -> Edit:
        expanded.append(node.id)
        return adding_editor(node)

    nodes = beam_search("Solve it.", word_score, counting_editor, beam_width=1, rounds=5, budget=4)
    assert len(nodes) == 4 and best(nodes).score == 0.5
    assert len(expanded) == 2  # once the budget is spent, no more expansions
    stuck = beam_search("Solve it.", word_score, lambda n: Edit("nothing", []), beam_width=2, rounds=3)
    assert len(stuck) == 1 and best(stuck).id == 0
    garbage = beam_search("Solve it.", word_score, lambda n: Edit("?", ["", "   "]), beam_width=2, rounds=2)
    assert len(garbage) == 1  # empty rewrites are dropped, not scored


def test_best_prefers_the_earlier_node_on_ties():
    nodes = beam_search(
        "a", lambda t: (1.0, {}), lambda n: Edit("c", [n.text + " b"]), beam_width=1, rounds=2
    )
    assert len(nodes) == 2 and best(nodes).id == 0  # the beam kept "a"; its rewrite again is no new node


def test_successive_halving_keeps_the_better_half():
    quality = [0.2, 0.9, 0.5, 0.7, 0.1]
    calls = []

    def score(c: int, tasks: int) -> tuple[float, dict]:
        calls.append((c, tasks))
        return quality[c], {"tasks": tasks}

    winner, trials = successive_halving(len(quality), score, max_tasks=40)
    assert winner == 1
    assert rung_tasks(5, 40) == [10, 20, 40]
    assert [t.candidate for t in trials if t.rung == 0] == [0, 1, 2, 3, 4]
    assert sorted(t.candidate for t in trials if t.rung == 1) == [1, 2, 3]
    assert sorted(t.candidate for t in trials if t.rung == 2) == [1, 3]
    assert calls == [(t.candidate, t.tasks) for t in trials]


def test_successive_halving_small_cases():
    assert rung_tasks(1, 7) == [7] and rung_tasks(2, 7) == [7] and rung_tasks(4, 3) == [1, 3]
    winner, trials = successive_halving(1, lambda c, n: (0.3, {}), max_tasks=5)
    assert winner == 0 and [(t.tasks, t.score) for t in trials] == [(5, 0.3)]
    winner, _ = successive_halving(3, lambda c, n: (1.0, {}), max_tasks=8)
    assert winner == 0  # ties go to the earlier (the current) candidate
    with pytest.raises(ValueError, match="no candidates"):
        successive_halving(0, lambda c, n: (0.0, {}), max_tasks=4)


def test_editor_messages_and_parsing():
    failures = [
        Failure({"question": f"q{i}", "answer": i}, ["<calc>1+1</calc>", "no"], 0.25) for i in range(5)
    ]
    text = critique_messages("Use tags.", failures)[1]["content"]
    assert "Use tags." in text and "q0" in text and f"q{MAX_FAILURES}" not in text and "Reward: 0.25" in text
    assert parse_rewrite("Sure!\n<prompt>\nBe precise.\n</prompt> done") == "Be precise."
    assert parse_rewrite("<prompt>Unclosed rule") == "Unclosed rule"
    assert parse_rewrite("  just text ") == "just text"
    asked = []

    def chat(messages):
        asked.append(messages[-1]["content"])
        return "Too vague." if len(asked) == 1 else f"<prompt>Rule {len(asked)}</prompt>"

    critique, rewrites = critique_and_rewrite(chat, "Use tags.", failures, n=2)
    assert critique == "Too vague." and rewrites == ["Rule 2", "Rule 3"]
    assert "Critique:\nToo vague." in asked[1]


def test_llm_prompt_reads_the_named_prompt():
    llm = LLM("http://x/v1", prompts={"system": "Be brief."})
    assert llm.prompt("system", default="ignored") == "Be brief."
    assert LLM("http://x/v1").prompt("system", default="Default.") == "Default."
    with pytest.raises(KeyError, match=r"prompts\.planner"):
        LLM("http://x/v1").prompt("planner")
    assert LLM("http://x/v1", temperature=0.0, prompts={"a": "b"}).temperature == 0.0


def test_optimize_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"optimize\.beam_width"):
        load_config(None, ["optimize.beam_width=0"], check_files=False)
    with pytest.raises(
        ConfigError, match=r"optimize\.editor\.model: required with optimize\.editor\.base_url"
    ):
        load_config(None, ["optimize.editor.base_url=http://x/v1"], check_files=False)
    with pytest.raises(ConfigError, match=r"optimize\.editor\.api_key_env: set without"):
        load_config(None, ["optimize.editor.api_key_env=KEY"], check_files=False)
    with pytest.raises(ConfigError, match=r"optimize\.candidates: .*listed twice"):
        load_config(None, ["optimize.candidates=[a, a]"], check_files=False)
    with pytest.raises(ConfigError, match=r"optimize\.typo: unknown field"):
        load_config(None, ["optimize.typo=1"], check_files=False)
    cfg = load_config(None, [], check_files=False)
    with pytest.raises(ConfigError, match=r"prompts\.system: not set"):
        check_optimize(cfg)
    cfg = load_config(None, ["prompts.system=Hi", "data.val=null"], check_files=False)
    with pytest.raises(ConfigError, match=r"data\.val: not set"):
        check_optimize(cfg)
    cfg = load_config(
        None, ["optimize.select=models", f"optimize.candidates=[{tmp_path}/nope]"], check_files=False
    )
    with pytest.raises(ConfigError, match=r"optimize\.candidates\[0\]: no such model folder"):
        check_optimize(cfg)
    check_optimize(load_config(None, ["optimize.candidates=[Be exact.]"], check_files=False))


def test_cli_parses_optimize_and_summaries_read():
    args = parse_args(["optimize", "c.yaml", "optimize.rounds=1"])
    assert args.command == "optimize" and args.overrides == ["optimize.rounds=1"]
    line = describe(
        {
            "mode": "search",
            "prompt": "system",
            "candidates": 5,
            "tasks": 20,
            "metric": "reward",
            "start_score": 0.25,
            "best_score": 0.5,
            "best_id": 3,
            "best_round": 2,
        }
    )
    assert "start 0.250 -> best 0.500 (candidate 3, round 2)" in line
    line = describe(
        {
            "mode": "select prompts",
            "candidates": 2,
            "metric": "success",
            "scores": {"A rule": 0.1, "B rule": 0.4},
            "best": "B rule",
            "best_score": 0.4,
            "tasks": 8,
        }
    )
    assert "best 'B rule' with 0.400 on 8 validation tasks" in line
