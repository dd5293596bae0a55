"""`lightning-ray optimize CONFIG`: improve a named prompt by beam search, or select among candidates.

Writes to the run directory (runs/<trainer.name>/optimize-<time>/):
- `candidates.jsonl`: every candidate scored, one line each, as it is scored;
- `search_tree.json` (the search): every node with its parent, round, the critique that led to it and its score;
- `selection.json` (a selection): every rung's trials;
- `best_prompt.txt` and `best_prompt.json` (a prompt search or selection), `best_model.txt` (a model selection);
- `summary.json`: what stdout said.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import openai

from lightning_ray.config import Config, ConfigError, resolve_path
from lightning_ray.faults import first_line
from lightning_ray.optimize.editor import Chat, critique_and_rewrite, endpoint_chat, gateway_chat
from lightning_ray.optimize.halving import Score as HalvingScore
from lightning_ray.optimize.halving import Trial, successive_halving
from lightning_ray.optimize.scoring import Stack, minibatch_failures, score_prompt, train_tasks
from lightning_ray.optimize.search import Edit, Node, beam_search, best

DEFAULT_PROMPT = "(the agent's default)"  # how a candidate of None (no `prompts.<name>`) is named


def check_optimize(cfg: Config) -> None:
    """What `optimize` needs beyond a valid config, before Ray starts; a ConfigError naming the field."""
    opt, where = cfg.optimize, cfg.source or "(inline)"
    problems = []
    if cfg.data.val is None:
        problems.append("data.val: not set; optimize scores every candidate on the validation split")
    if not opt.candidates and opt.prompt not in cfg.prompts:
        problems.append(
            f"prompts.{opt.prompt}: not set; the search (optimize.prompt={opt.prompt!r}) starts from that text "
            "(or list optimize.candidates to select among)"
        )
    if opt.select == "models":
        base = Path(cfg.source).parent if cfg.source else Path.cwd()
        problems += [
            f"optimize.candidates[{i}]: no such model folder: {path}"
            for i, path in enumerate(opt.candidates)
            if not path.startswith("builtin:") and not resolve_path(path, base).exists()
        ]
    if problems:
        raise ConfigError(f"invalid config {where}:\n" + "\n".join(f"  {p}" for p in problems))


def optimize(cfg: Config) -> dict[str, Any]:
    """The `optimize` command: a model selection starts a stack per candidate; a prompt search or selection
    shares one stack (the validation pool, plus the training pool for the search's minibatches)."""
    from lightning_ray.rollouts.stack import start_rollout_stack, stop_rollout_stack
    from lightning_ray.runtime import init_ray, run_directory
    from lightning_ray.tasks.actor import task_pool_from_config

    check_optimize(cfg)
    init_ray(cfg)
    run_dir = run_directory(cfg, "optimize")
    if cfg.optimize.candidates and cfg.optimize.select == "models":
        return finish(run_dir, select_models(cfg, run_dir))
    inference, val_pool, workers = start_rollout_stack(cfg, "val")
    train_pool = None
    try:
        if not cfg.optimize.candidates:
            train_pool = task_pool_from_config(cfg, "train")
        return finish(run_dir, optimize_prompt(cfg, run_dir, inference, Stack(val_pool, workers, train_pool)))
    finally:
        stop_rollout_stack(cfg, workers, [val_pool, train_pool])


def optimize_prompt(cfg: Config, run_dir: Path, inference: Any, stack: Stack) -> dict[str, Any]:
    """On a running stack: select among `optimize.candidates`, or search with the configured editor (by default
    the policy behind `inference`, through a gateway of its own)."""
    if cfg.optimize.candidates:
        return select_prompts(cfg, run_dir, stack)
    if cfg.optimize.editor.base_url is not None:
        return search_prompt(cfg, run_dir, stack, endpoint_chat(cfg.optimize.editor))
    from lightning_ray.gateway.server import start_gateway_thread

    gateway = start_gateway_thread(cfg, handle=inference)
    try:
        return search_prompt(cfg, run_dir, stack, gateway_chat(gateway, cfg.optimize.editor))
    finally:
        gateway.stop_sync()


def search_prompt(cfg: Config, run_dir: Path, stack: Stack, chat: Chat) -> dict[str, Any]:
    """Beam search from `prompts.<optimize.prompt>`; writes candidates.jsonl, search_tree.json and the best."""
    opt = cfg.optimize
    tasks = train_tasks(cfg)

    def expand(node: Node) -> Edit:
        failures = minibatch_failures(cfg, stack, node.text, tasks)
        if not failures:  # nothing to learn from: no gradient, no step
            return Edit("(no failures on the minibatch)", [])
        try:
            return Edit(*critique_and_rewrite(chat, node.text, failures, opt.candidates_per_step))
        except openai.APIError as e:  # e.g. a prompt past the editor's context: this node makes no step
            print(f"warning: the editor failed on candidate {node.id}: {first_line(e)}", file=sys.stderr)
            return Edit(f"(the editor failed: {first_line(e)})", [])

    (run_dir / "candidates.jsonl").write_text("")
    nodes = beam_search(
        cfg.prompts[opt.prompt],
        lambda text: score_prompt(cfg, stack, text, opt.val_limit),
        expand,
        beam_width=opt.beam_width,
        rounds=opt.rounds,
        budget=opt.budget,
        on_node=lambda node: append_line(run_dir / "candidates.jsonl", node.to_dict()),
    )
    top = best(nodes)
    tree = {"prompt": opt.prompt, "metric": opt.metric, "best": top.id, "nodes": [n.to_dict() for n in nodes]}
    (run_dir / "search_tree.json").write_text(json.dumps(tree, indent=2) + "\n")
    write_best_prompt(run_dir, opt.prompt, top.text, top.score, nodes[0].score)
    return {
        "mode": "search",
        "prompt": opt.prompt,
        "metric": opt.metric,
        "candidates": len(nodes),
        "start_score": nodes[0].score,
        "best_score": top.score,
        "best_id": top.id,
        "best_round": top.round,
        "best_text": top.text,
        "tasks": (top.details or {}).get("tasks"),
    }


def select_prompts(cfg: Config, run_dir: Path, stack: Stack) -> dict[str, Any]:
    """Successive halving over the current prompt (`prompts.<name>`, or the agent's default) and the listed
    ones; writes candidates.jsonl, selection.json and the best."""
    opt = cfg.optimize
    current = cfg.prompts.get(opt.prompt)
    texts: list[str | None] = [current, *(c for c in opt.candidates if c != current)]
    result = select(
        cfg,
        run_dir,
        [DEFAULT_PROMPT if t is None else t for t in texts],
        lambda i, n: score_prompt(cfg, stack, texts[i], n),
    )
    winner = texts[result["best_index"]]
    if winner is not None:
        write_best_prompt(run_dir, opt.prompt, winner, result["best_score"], None)
    return result


def select_models(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Successive halving over `model.path` and the listed models; each trial deploys its model (replicas and
    rollout workers) and stops it after scoring. Writes candidates.jsonl, selection.json and best_model.txt."""
    from lightning_ray.rollouts.stack import start_rollout_stack, stop_rollout_stack

    paths = [cfg.model.path, *(c for c in cfg.optimize.candidates if c != cfg.model.path)]

    def score(i: int, n: int) -> tuple[float, dict[str, Any]]:
        trial_cfg = cfg.model_copy(deep=True)
        trial_cfg.model.path = paths[i]
        _, val_pool, workers = start_rollout_stack(trial_cfg, "val")
        try:
            return score_prompt(trial_cfg, Stack(val_pool, workers), cfg.prompts.get(cfg.optimize.prompt), n)
        finally:
            stop_rollout_stack(trial_cfg, workers, [val_pool])

    result = select(cfg, run_dir, paths, score)
    (run_dir / "best_model.txt").write_text(paths[result["best_index"]] + "\n")
    return result


def select(cfg: Config, run_dir: Path, names: list[str], score: HalvingScore) -> dict[str, Any]:
    """Successive halving of the candidates `names` over the validation split's first `optimize.val_limit`
    tasks (all when unset)."""
    from lightning_ray.tasks.dataset import load_tasks

    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    num_val = len(load_tasks(resolve_path(str(cfg.data.val), base)))
    max_tasks = min(cfg.optimize.val_limit or num_val, num_val)
    (run_dir / "candidates.jsonl").write_text("")

    def log(trial: Trial) -> None:
        append_line(
            run_dir / "candidates.jsonl", {**trial_dict(trial), "candidate_text": names[trial.candidate]}
        )

    winner, trials = successive_halving(len(names), score, max_tasks, on_trial=log)
    final = [t for t in trials if t.candidate == winner][-1]
    selection = {"candidates": names, "best_index": winner, "trials": [trial_dict(t) for t in trials]}
    (run_dir / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return {
        "mode": f"select {cfg.optimize.select}",
        "metric": cfg.optimize.metric,
        "candidates": len(names),
        "best_index": winner,
        "best": names[winner],
        "best_score": final.score,
        "tasks": final.tasks,
        "scores": {names[t.candidate]: t.score for t in trials if t.rung == 0},
    }


def trial_dict(trial: Trial) -> dict[str, Any]:
    return {
        "candidate": trial.candidate,
        "rung": trial.rung,
        "tasks": trial.tasks,
        "score": trial.score,
        "details": trial.details,
    }


def append_line(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_best_prompt(run_dir: Path, name: str, text: str, score: float | None, start: float | None) -> None:
    (run_dir / "best_prompt.txt").write_text(text + "\n")
    best_json = {"name": name, "text": text, "score": score, "start_score": start}
    (run_dir / "best_prompt.json").write_text(json.dumps(best_json, indent=2) + "\n")


def describe(result: dict[str, Any]) -> str:
    """The short summary `optimize` prints."""

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    if result["mode"] == "search":
        return (
            f"prompt {result['prompt']!r}: {result['candidates']} candidates scored on {result['tasks']} "
            f"validation tasks ({result['metric']}): start {fmt(result['start_score'])} -> best "
            f"{fmt(result['best_score'])} (candidate {result['best_id']}, round {result['best_round']})"
        )
    scores = ", ".join(f"{_short(name)}: {fmt(s)}" for name, s in result["scores"].items())
    return (
        f"{result['mode']}: {result['candidates']} candidates ({result['metric']}; first rung: {scores}); "
        f"best {_short(result['best'])} with {fmt(result['best_score'])} on {result['tasks']} validation tasks"
    )


def _short(text: str, width: int = 48) -> str:
    one_line = " ".join(text.split())
    return repr(one_line if len(one_line) <= width else one_line[: width - 3] + "...")


def finish(run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Print the summary and write summary.json beside the outputs."""
    result = {**result, "run_dir": str(run_dir)}
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(describe(result))
    print(f"outputs in {run_dir}")
    return result
