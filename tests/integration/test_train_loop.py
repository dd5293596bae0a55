"""The GRPO loop end to end on the tiny model: steps, versions, checkpoints, and an exact resume."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from transformers import AutoModelForCausalLM

from lightning_ray.loop import latest_checkpoint, train
from lightning_ray.monitor.run_log import read_metrics


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


def test_train_checkpoint_and_resume(inference, tiny_config, tmp_path):
    cfg = loop_config(tiny_config, tmp_path, steps=2)
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

    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step-000002"
    AutoModelForCausalLM.from_pretrained(ckpt)  # HF format, loadable as is

    cfg.trainer.steps = 3
    train(cfg, resume=str(run_dir))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["rollout/policy_version"] == 2  # resumed weights were broadcast as version 2
    assert latest_checkpoint(run_dir).name == "step-000003"
