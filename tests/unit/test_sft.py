"""SFT (`algorithm.name: sft`) without a cluster: the loss against a hand-computed NLL, the best-of-group choice,
the files a run directory holds, and the config's errors naming the field and the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from lightning_ray.algorithms.losses import sft_loss, token_logprobs
from lightning_ray.algorithms.sft import select_best
from lightning_ray.config import ConfigError, load_config
from lightning_ray.config.sft import sft_steps
from lightning_ray.data.sft_files import load_sft_files
from lightning_ray.learner.forward import forward_logprobs
from lightning_ray.learner.packing import pack_batch
from tests.unit.test_algorithms_batch import make_table
from tests.unit.test_packing import tiny_llama, with_loss_mask

VIEW_RUN = Path(__file__).resolve().parents[1] / "data" / "view_run"


def succeeded(table: pa.Table) -> pa.Table:
    return table.set_column(
        table.schema.get_field_index("status"), "status", pa.array(["succeeded"] * len(table))
    )


def test_sft_loss_is_the_nll_of_generated_tokens_only():
    """Packed rows, one with a tool result inside its response (loss_mask 0): the loss equals the NLL of the
    generated tokens, each row scored alone by a plain forward, and nothing else."""
    table = make_table(
        [
            ("g", "a", [1, 2, 3], [4, 5, 6, 7, 8], 1.0),  # 6, 7 inserted (a tool result)
            ("g", "b", [1, 2, 3], [9, 10], 1.0),  # the same prompt: packed once
            ("h", "c", [11, 12], [13, 14, 15], 1.0),
        ]
    )
    masks = [[1, 1, 0, 0, 1], [1, 1], [1, 1, 1]]
    model = tiny_llama()
    logp, _ = forward_logprobs(model, pack_batch(with_loss_mask(table, masks)))
    loss, metrics = sft_loss(logp, pack_batch(with_loss_mask(table, masks))["response_mask"])

    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, response, mask in zip(
            table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist(), masks, strict=True
        ):
            ids = torch.tensor([prompt + response])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for j, (token, generated) in enumerate(zip(response, mask, strict=True)):
                if generated:  # position len(prompt) + j - 1 predicts response token j
                    nll -= float(logprobs[len(prompt) + j - 1, token])
                    count += 1
    assert count == 8
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)
    assert float(metrics["nll"]) == pytest.approx(nll / count, rel=1e-5)


def test_sft_loss_gives_no_gradient_to_prompt_and_inserted_tokens():
    prompt, response, generated = [1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 1, 0, 0, 1]
    model = tiny_llama()
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0]
    logits.retain_grad()
    logp = token_logprobs(logits[:-1], ids[0, 1:])  # position t predicts token t + 1
    mask = torch.tensor([0.0] * (len(prompt) - 1) + [float(g) for g in generated])
    loss, _ = sft_loss(logp, mask)
    loss.backward()
    per_position = logits.grad.abs().sum(-1)
    predicts_generated = mask.bool().tolist() + [False]  # the last position predicts nothing
    assert all(per_position[i] > 0 for i, g in enumerate(predicts_generated) if g)
    assert all(per_position[i] == 0 for i, g in enumerate(predicts_generated) if not g)
    # and the value: the mean NLL of the three generated tokens
    expected = -(logp * mask).sum() / 3
    assert float(loss.detach()) == pytest.approx(float(expected.detach()))


def test_sft_loss_with_a_global_denominator_sums_over_micro_batches():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    whole, _ = sft_loss(logp, mask)
    parts = sum(float(sft_loss(logp[i : i + 1], mask[i : i + 1], denominator=3.0)[0]) for i in range(2))
    assert float(whole) == pytest.approx(2.0) and parts == pytest.approx(2.0)
    empty, _ = sft_loss(logp, torch.zeros_like(mask))
    assert float(empty) == 0.0  # a rank-padding micro-batch adds nothing


def test_select_best_keeps_the_best_of_each_group_and_says_why_not_the_rest():
    table = make_table(
        [
            ("g1", "a", [1], [2], 0.5),
            ("g1", "b", [1], [3], 1.0),
            ("g1", "b", [1, 3, 4], [5], 1.0),  # b's second call
            ("g1", "c", [1], [6], 1.0),  # ties with b: the first in the table wins
            ("g2", "d", [1], [7], 0.2),
            ("g2", "e", [1], [8], 0.4),
            ("g3", "f", [1], [9], None),
            ("g3", "g", [1], [9], 2.0),
        ]
    )
    table = succeeded(table)
    status = table["status"].to_pylist()
    status[-1] = "failed"
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    kept, dropped, metrics = select_best(table, min_reward=0.5, per_group=1)
    assert kept["rollout_id"].to_pylist() == ["b", "b"]
    assert dropped == {
        "a": "not_best",
        "c": "not_best",
        "d": "below_min_reward",
        "e": "below_min_reward",
        "f": "no_reward",
        "g": "failed",
    }
    assert metrics == {
        "rollouts": 7,
        "rollouts_kept": 1,
        "groups": 3,
        "groups_kept": 1,
        "reward_mean_kept": 1.0,
    }
    kept, dropped, _ = select_best(table, min_reward=0.5, per_group=None)
    assert sorted(set(kept["rollout_id"].to_pylist())) == ["a", "b", "c"] and "a" not in dropped


def test_files_of_a_run_directory_selected_and_batched_by_step(tmp_path):
    """tests/data/view_run is a real 3-step GRPO run of the tiny model: its calls, rewards and ledger."""
    cfg = load_config(
        None,
        ["algorithm.name=sft", "sft.source=files", f"sft.files=[{VIEW_RUN}]", "sft.batch_size=4"],
    )
    files = load_sft_files(cfg)
    calls = pa.concat_tables(
        pq.read_table(p) for p in sorted(VIEW_RUN.glob("trajectories/step-00000?.parquet"))
    )
    groups = pc.unique(calls["group_id"]).to_pylist()
    assert files.stats == {
        "files": 3,
        "rollouts": len(pc.unique(calls["rollout_id"])),
        "rollouts_kept": 6,
        "groups": len(groups),
        "groups_kept": 6,
        "reward_mean_kept": 1.0,
    }
    assert len(files.rollout_ids) == 6 and min(files.calls["reward"].to_pylist()) >= 1.0
    kept_groups = files.calls["group_id"].to_pylist()
    assert len(set(kept_groups)) == 6 and set(kept_groups) <= set(groups)  # one rollout of each group

    seen = []
    for step in (1, 2, 3):
        batch, where = files.batch(step, 4, seed=0, shuffle=True)
        assert batch.equals(files.batch(step, 4, seed=0, shuffle=True)[0])  # a resumed step trains the same
        seen.append(set(batch["rollout_id"].to_pylist()))
        assert where == {"sft/epoch": step / 2, "sft/rollouts": len(seen[-1])}
    assert [len(s) for s in seen] == [4, 2, 4]  # an epoch of 6 rollouts: a batch of 4, then the other 2
    assert seen[0] | seen[1] == set(files.rollout_ids)

    trained = load_sft_files(
        cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"trained_only": True})})
    )
    assert trained.stats["rollouts"] < files.stats["rollouts"]  # dropped groups' calls were left out


def test_sft_errors_name_the_field_and_the_file(tmp_path):
    def error(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_sft_files(load_config(None, ["algorithm.name=sft", "sft.source=files", *overrides]))
        return str(e.value)

    assert "sft.files[0]: no such file or directory: nowhere" in error("sft.files=[nowhere]")
    assert "sft.files[0]" in error(f"sft.files=[{tmp_path}]") and "holds no trajectories" in error(
        f"sft.files=[{tmp_path}]"
    )
    rollouts = VIEW_RUN / "trajectories" / "step-000001-rollouts.parquet"
    assert f"sft.files[0]: {rollouts} is not a trajectories call table: no column agent" in error(
        f"sft.files=[{rollouts}]"
    )
    assert "sft.min_reward: no rollout of sft.files" in error(f"sft.files=[{VIEW_RUN}]", "sft.min_reward=7")
    copy = tmp_path / "run"
    shutil.copytree(VIEW_RUN / "trajectories", copy / "trajectories")
    assert "sft.trained_only:" in error(f"sft.files=[{copy}]", "sft.trained_only=true")
    with pytest.raises(ConfigError, match="sft.files: empty"):
        load_config(None, ["algorithm.name=sft", "sft.source=files"])
    with pytest.raises(ConfigError, match="sft: set, but algorithm.name is grpo"):
        load_config(None, ["sft.min_reward=0.5"])


def test_sft_settings():
    cfg = load_config(None, ["algorithm.name=sft", "trainer.max_staleness=1"], check_files=False)
    assert cfg.algorithm.drop_zero_variance is False  # a group whose samples all succeeded still trains
    for algorithm in ("grpo", "sft"):  # every rollout worker validates the driver's dump again
        dumped = load_config(None, [f"algorithm.name={algorithm}"], check_files=False).model_dump()
        assert type(cfg).model_validate(dumped).algorithm.name == algorithm
    assert sft_steps(cfg.sft.model_copy(update={"epochs": 2.0, "batch_size": 4}), 6, 10) == 4
    assert sft_steps(cfg.sft.model_copy(update={"epochs": 0.5, "batch_size": 4}), 6, 10) == 1
    assert sft_steps(cfg.sft, 6, 10) == 10
