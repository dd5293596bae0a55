"""The run page's reader of a run directory: filters, paging, a run that is still writing, failure patterns, and
how long it takes with 100k recorded calls. The run directories are written with the project's own schema
functions (`group_tables`, `write_parquet`, `append_row`), as a training run writes them."""

from __future__ import annotations

import time
from pathlib import Path

from lightning_ray.data.schema import FinishedRollout, Transition, group_tables, write_parquet
from lightning_ray.monitor.run_log import append_row
from lightning_ray.view.run_data import Filters, RunData


def rollout(
    step: int, i: int, calls: int = 2, kind: str | None = None, role: str = "solver"
) -> FinishedRollout:
    transitions = [
        Transition(
            call_index=c,
            agent=role if c == 0 else "critic",
            prompt_ids=[1, 2, 3 + c],
            response_ids=[4, 5],
            response_logprobs=[-0.1, -2.0],
            response_versions=[step - 1, step - 1],
            policy_version=step - 1,
            finish_reason="stop",
            latency_s=0.1,
            response_text=f"answer {step}-{i}-{c}",
        )
        for c in range(calls)
    ]
    return FinishedRollout(
        rollout_id=f"r{step}x{i}",
        task_id=f"task-{i % 7}",
        group_id=f"g{step}x{i // 4}",
        attempt=1,
        status="failed" if kind else "succeeded",
        transitions=transitions,
        reward=None if kind else (i % 4) / 4,
        failure_kind=kind,
        error_type="ValueError" if kind else None,
        error_message=f"bad value {i}" if kind else None,
        traceback=f"Traceback ...\nValueError: bad value {i}" if kind else None,
        logs=f"log of {i}",
    )


def write_step(run_dir: Path, step: int, rollouts: list[FinishedRollout]) -> None:
    tables = group_tables(rollouts)
    write_parquet(tables["rollouts"], run_dir, f"step-{step:06d}-rollouts")
    write_parquet(tables["transitions"], run_dir, f"step-{step:06d}")
    append_row(run_dir / "metrics.jsonl", {"step": step, "rollout/reward_mean": 0.5})


def test_filters_paging_and_a_run_that_is_still_writing(tmp_path):
    for step in (1, 2):
        write_step(
            tmp_path,
            step,
            [
                rollout(step, i, kind="tool_error" if i == 3 else None, role="solver" if i % 2 else "planner")
                for i in range(8)
            ],
        )
    data = RunData(tmp_path)
    assert data.page(Filters()).total == 16
    assert [r["step"] for r in data.page(Filters(), size=8).rows] == [2] * 8  # newest step first
    assert data.page(Filters(step=1)).total == 8
    assert {r["task_id"] for r in data.page(Filters(task="task-3")).rows} == {"task-3"}
    assert {r["reward"] for r in data.page(Filters(min_reward=0.5, max_reward=0.6)).rows} == {0.5}
    assert data.page(Filters(failure="tool_error")).total == data.page(Filters(failure="any")).total == 2
    assert data.page(Filters(failure="none")).total == 14
    assert data.page(Filters(role="planner")).total == 8 and data.page(Filters(role="plan")).total == 0
    assert data.roles() == ["critic", "planner", "solver"]
    page = data.page(Filters(), page=2, size=5)
    assert (page.page, page.pages, len(page.rows)) == (2, 4, 5)
    assert data.page(Filters(), page=99, size=5).page == 4

    write_step(tmp_path, 3, [rollout(3, i) for i in range(4)])  # the run wrote another step
    assert data.page(Filters()).total == 20 and data.steps() == [1, 2, 3]
    [row] = data.page(Filters(step=3, task="task-1")).rows
    calls = data.calls(3, row["rollout_id"], row["attempt"])
    assert [c["response_text"] for c in calls] == ["answer 3-1-0", "answer 3-1-1"]
    assert data.rollout_row(3, row["rollout_id"], 1)["logs"] == "log of 1"
    assert [r["step"] for r in data.metrics()] == [1, 2, 3]


def test_failure_patterns_keep_an_example_traceback(tmp_path):
    write_step(tmp_path, 1, [rollout(1, i, kind="agent_exception" if i < 3 else None) for i in range(6)])
    summary, examples = RunData(tmp_path).failures()
    assert summary.failures_by_kind == {"agent_exception": 3}
    [pattern] = summary.patterns
    assert pattern.count == 3 and pattern.template == "bad value <num>"
    assert pattern.example_traceback.startswith("Traceback") and pattern.example_rollout_id in examples


def test_100k_calls_stay_responsive(tmp_path):
    """100 steps x 500 rollouts x 2 calls: the first read builds the index once, a filtered page or an opened
    rollout then takes well under a second (the numbers are printed; pytest -s shows them)."""
    for step in range(1, 101):
        write_step(
            tmp_path, step, [rollout(step, i, kind="timeout" if i % 50 == 0 else None) for i in range(500)]
        )
    data = RunData(tmp_path)
    t0 = time.perf_counter()
    assert data.page(Filters()).total == 50_000
    t1 = time.perf_counter()
    page = data.page(Filters(failure="timeout", task="task-2"), page=2)
    t2 = time.perf_counter()
    row = page.rows[0]
    calls = data.calls(row["step"], row["rollout_id"], row["attempt"])
    t3 = time.perf_counter()
    summary, _ = data.failures()
    t4 = time.perf_counter()
    print(
        f"100k calls: index {t1 - t0:.2f}s, filtered page {t2 - t1:.3f}s, open {t3 - t2:.3f}s, failures {t4 - t3:.3f}s"
    )
    assert len(calls) == 2 and summary.failures_by_kind == {"timeout": 1000}
    assert t2 - t1 < 1.0 and t3 - t2 < 1.0 and t4 - t3 < 2.0 and t1 - t0 < 20.0


def test_the_wandb_table_samples_a_steps_rollouts(tmp_path):
    from lightning_ray.monitor.wandb_table import COLUMNS, sampled_rollouts, trajectory_table

    write_step(tmp_path, 1, [rollout(1, i) for i in range(16)])
    rows = sampled_rollouts(tmp_path, 1)
    assert len(rows) == 8 and len({r[3] for r in rows}) == 4  # spread over the step's 4 groups
    step, task, rollout_id, *_, calls, responses = rows[0]
    assert (step, calls) == (1, 2) and responses.endswith(f"answer 1-{rollout_id.split('x')[1]}-1")
    assert sampled_rollouts(tmp_path, 2) == [] and trajectory_table(tmp_path, 2) is None
    assert trajectory_table(tmp_path, 1).columns == COLUMNS


def test_the_view_command_line(tmp_path, capsys):
    from lightning_ray.cli import main, parse_args

    args = parse_args(["view", str(tmp_path), "--host", "0.0.0.0", "--port", "0"])
    assert (args.command, args.run_dir, args.host, args.port, args.token) == (
        "view",
        str(tmp_path),
        "0.0.0.0",
        0,
        None,
    )
    assert main(["view", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_a_page_bound_beyond_loopback_gets_a_token():
    from lightning_ray.view.app import page_url, view_token

    assert view_token("127.0.0.1", None) is None and view_token("::1", None) is None
    token = view_token("0.0.0.0", None)
    assert token and len(token) >= 16 and view_token("0.0.0.0", "mine") == "mine"
    assert page_url("127.0.0.1", 8266, None) == "http://127.0.0.1:8266/"
    assert page_url("10.0.0.5", 8266, "t") == "http://10.0.0.5:8266/?token=t"


def test_an_offline_wandb_run_gets_the_table_at_validation_steps(tmp_path, monkeypatch):
    from lightning_ray.config import load_config
    from lightning_ray.monitor.run_log import RunLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    write_step(tmp_path, 1, [rollout(1, i) for i in range(8)])
    cfg = load_config(None, ["logging.wandb=true", "logging.report=false"], check_files=False)
    log = RunLog(cfg, tmp_path)
    log.log(1, {"rollout/reward_mean": 0.5, "val/success_rate": 0.25})
    log.close()
    [table] = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/trajectories_*.table.json"))
    assert "[1 critic] answer 1-7-1" in table.read_text()  # the last sampled rollout's second call
