"""The GRPO loop end to end on the tiny model: steps, versions, checkpoints, and an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from lightning_ray.checkpoints import latest_checkpoint
from lightning_ray.config import load_config
from lightning_ray.data.merge import merge_prefix_turns
from lightning_ray.loop import train
from lightning_ray.monitor.run_log import read_metrics

REPO = Path(__file__).resolve().parents[2]


def loop_config(tiny_config, tmp_path, steps: int):
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"t{i}", "question": f"What is {i} + {i}?"}) + "\n" for i in range(12))
    )
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.train = cfg.data.val = str(data)
    cfg.rollout.agent = "tests.agents:varied_agent"
    cfg.rollout.num_workers, cfg.rollout.concurrency = 1, 8
    cfg.algorithm.group_size = 4
    cfg.learner.num_cpus_per_worker, cfg.learner.lr = 0.5, 1e-4
    cfg.trainer.steps, cfg.trainer.tasks_per_step = steps, 2
    cfg.trainer.val_every, cfg.trainer.val_limit, cfg.trainer.checkpoint_every = 2, 4, 1
    cfg.trainer.run_dir, cfg.trainer.name = str(tmp_path / "runs"), "loop"
    cfg.logging.wandb = False
    return cfg


def assert_accounted(run_dir: Path, printed: str, started: int) -> None:
    """The run's end proves nothing was lost: summary.json's accounting and the line printed from it agree."""
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["rollouts"]
    assert summary["status"] == "completed" and acc["lost"] == 0 and acc["started"] == started, summary
    assert acc["started"] == acc["trained"] + sum(acc["dropped"].values()) + sum(acc["failed"].values())
    assert f"{acc['trained']} trained" in printed and "lost 0" in printed


def test_train_checkpoint_and_resume(inference, tiny_config, tmp_path, capsys):
    cfg = loop_config(tiny_config, tmp_path, steps=2)
    cfg.algorithm.drop_zero_variance = False  # the random model may give a step no variance; it must train
    rows = train(cfg)
    assert [r["step"] for r in rows] == [0, 1, 2]
    [run_dir] = list((tmp_path / "runs" / "loop").iterdir())
    assert (run_dir / "report.html").exists()
    step2 = rows[2]
    assert step2["rollout/rollouts"] == 8
    assert step2["rollout/policy_version"] == 1  # step 2's rollouts came from the weights of step 1
    assert "val/success_rate" in step2
    calls = pq.read_table(run_dir / "trajectories" / "step-000002.parquet")
    assert calls.num_rows == 8 and set(calls["policy_version"].to_pylist()) == {1}
    assert_accounted(run_dir, capsys.readouterr().out, started=16)  # 2 steps x 2 groups of 4

    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-000002"
    AutoModelForCausalLM.from_pretrained(ckpt)  # HF format, loadable as is

    cfg.trainer.steps = 3
    train(cfg, resume=str(run_dir))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["rollout/policy_version"] == 2  # resumed weights were broadcast as version 2
    assert latest_checkpoint(run_dir).name == "step-000003"
    assert_accounted(run_dir, capsys.readouterr().out, started=8)  # the resumed process: step 3's 2 groups


@pytest.mark.slow  # CI time: merging is unit-tested (test_merge.py); this is the same loop on merged rows
def test_train_step_on_merged_multi_turn_rollouts(inference, tiny_config, tmp_path):
    """`algorithm.merge_prefix_turns`: a rollout's three prefix-extending calls train as one sequence, and the
    learner counts only the tokens the model generated (the inserted user turns are masked out)."""
    cfg = loop_config(tiny_config, tmp_path, steps=1)
    cfg.rollout.agent = "tests.agents:chatty_agent"
    cfg.algorithm.merge_prefix_turns, cfg.algorithm.drop_zero_variance = True, False
    cfg.trainer.val_every = 0
    [row] = train(cfg)
    [run_dir] = list((tmp_path / "runs" / "loop").iterdir())
    calls = pq.read_table(run_dir / "trajectories" / "step-000001.parquet")
    assert row["rollout/rollouts"] == 8 and row["rollout/llm_calls"] == calls.num_rows == 24
    # One sequence per rollout, unless the random model generated a special token: the text the agent sends
    # back lacks it, so that turn cannot extend the recorded ids and stays its own sequence.
    sequences = merge_prefix_turns(calls).num_rows
    assert 8 <= sequences < 12
    assert row["advantage/rows"] == row["learner/sequences"] == sequences
    generated = sum(len(ids) for ids in calls["response_ids"].to_pylist())
    assert row["learner/tokens"] == generated


@pytest.mark.parametrize(
    "name",
    [
        # CI time: each framework's rollouts run in CI (test_frameworks.py); training them is the same loop
        pytest.param("calc_openai_agents", marks=pytest.mark.slow),
        pytest.param("calc_langgraph", marks=pytest.mark.slow),
        pytest.param("calc_autogen", marks=pytest.mark.slow),
    ],
)
def test_framework_config_trains(name, inference, tiny_config, tmp_path):
    """Each framework example's own config (`configs/<name>.yaml`), on the tiny model, through one GRPO step:
    the framework's calls are recorded, trained on, and the step's checkpoint loads in transformers."""
    cfg = load_config(
        REPO / "configs" / f"{name}.yaml",
        [
            f"model.path={tiny_config.model.path}",
            "model.dtype=float32",
            "inference.kv_cache_gib=1",
            "inference.num_cpus_per_replica=0.5",
            "inference.max_model_len=1024",
            "inference.sampling.max_tokens=16",
            "rollout.concurrency=8",
            "learner.num_cpus_per_worker=0.5",
            "algorithm.group_size=4",
            "algorithm.drop_zero_variance=false",
            "data.val=null",
            "trainer.steps=1",
            "trainer.tasks_per_step=2",
            f"trainer.run_dir={tmp_path / 'runs'}",
            "logging.wandb=false",
        ],
    )
    [row] = train(cfg)
    assert row["rollout/rollouts"] == 8 and row["rollout/llm_calls"] >= 8
    assert row["learner/sequences"] >= 8 and row["learner/tokens"] > 0
    [run_dir] = list((tmp_path / "runs" / name).iterdir())
    AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir))
