"""Learner faults on the tiny Llama with real DeepSpeed (gloo, two ranks): a step whose loss or gradients are
not finite is skipped by every rank with weights and optimizer state bit-identical, `max_bad_steps` of them
in a row raise `NonFiniteSteps`; a rank killed or frozen mid-call ends in `LearnerFailed` within a bounded
time (not a hang), and a fresh group resumes from the last checkpoint. Run under the shared lock:
    flock /tmp/lr-heavy.lock python -m pytest tests/integration/test_learner_faults.py -x -q
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from ray import cloudpickle

from lightning_ray.algorithms.advantages import ADVANTAGE_COLUMN, compute_advantages
from lightning_ray.config import AlgorithmConfig, LoraConfig
from lightning_ray.learner.group import LearnerFailed, LearnerGroup, NonFiniteSteps
from tests.integration.test_learner import learner_cfg, make_table

# The functions below run inside the ranks (`__ray_call__`), where this test module cannot be imported.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def batch() -> pa.Table:
    table, _ = compute_advantages(make_table(), AlgorithmConfig())
    return table


def with_advantages(table: pa.Table, change: dict[int, float]) -> pa.Table:
    """The table with the advantages of some rows (index -> value) replaced."""
    adv = table.column(ADVANTAGE_COLUMN).to_numpy().astype(np.float32)
    for row, value in change.items():
        adv[row] = value
    return table.set_column(table.column_names.index(ADVANTAGE_COLUMN), ADVANTAGE_COLUMN, pa.array(adv))


def _rank_state(worker: Any) -> dict[str, Any]:
    """Runs in a rank: its weights (its ZeRO-3 partition) and its optimizer's full state."""
    engine = worker.engine
    params = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]
    optimizer = engine.optimizer.state_dict()
    optimizer.pop("overflow", None)  # ZeRO-3 keeps the last step's verdict in its state: True after a skip
    return {"params": params, "optimizer": optimizer}


def snapshot(group: LearnerGroup) -> list[dict[str, Any]]:
    import ray

    return ray.get([w.__ray_call__.remote(_rank_state) for w in group.workers])


def assert_identical(a: Any, b: Any, where: str = "state") -> None:
    """Bit-identical tensors, equal everything else, recursively."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler: no __eq__
        assert type(a) is type(b), where
        assert_identical(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


def changed(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return any(
        not torch.equal(x, y)
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra["params"], rb["params"], strict=True)
    )


@pytest.mark.parametrize("variant", ["zero0_two_ranks", "zero3_two_ranks", "lora"])
def test_nonfinite_loss_skips_the_step_on_every_rank(ray_cluster, tiny_model_dir, batch, variant):
    """NaN / inf advantages in one GRPO group (so on one rank only): both ranks skip, nothing changes; a finite
    step then trains and ends the run of bad steps; 3 bad steps in a row raise NonFiniteSteps."""
    if variant == "lora":
        pytest.importorskip("peft")
    kw = {
        "zero0_two_ranks": {"zero_stage": 0},
        "zero3_two_ranks": {"zero_stage": 3},
        "lora": {"zero_stage": 0, "lora": LoraConfig(rank=4, alpha=8.0)},
    }[variant]
    group = LearnerGroup(learner_cfg(lr=1e-2, **kw), tiny_model_dir, max_bad_steps=3)
    algo = AlgorithmConfig()
    nan_g0 = with_advantages(batch, {0: math.nan})  # row 0 is in group g0: one rank's shard
    inf_g1 = with_advantages(batch, {5: math.inf})
    try:
        before = snapshot(group)
        for table in (nan_g0, inf_g1):
            m = group.train_step(table, algo)
            assert (m["skipped_steps"], m["skipped_nonfinite_loss"], m["optimizer_steps"]) == (1, 1, 0)
            assert not math.isfinite(m["loss"])
            assert_identical(snapshot(group), before)
        good = group.train_step(batch, algo)  # learner step 3
        assert good["optimizer_steps"] == 1 and good["skipped_steps"] == 0 and math.isfinite(good["loss"])
        assert changed(before, snapshot(group))
        group.train_step(nan_g0, algo)
        group.train_step(inf_g1, algo)
        with pytest.raises(NonFiniteSteps, match="3 learner steps in a row") as e:
            group.train_step(nan_g0, algo)
        assert e.value.steps == {4: ["nonfinite_loss"], 5: ["nonfinite_loss"], 6: ["nonfinite_loss"]}
    finally:
        group.shutdown()


def _overflow_layer0(worker: Any) -> None:
    """Runs in a rank: layer 0's attention writes nothing (o_proj = 0) but one value feature is 1e37, so the
    forward and the loss stay finite and exact while o_proj's gradient (1e37 x the upstream gradient) is not."""
    attn = worker.engine.module.model.layers[0].self_attn
    with torch.no_grad():
        attn.o_proj.weight.zero_()
        attn.v_proj.weight[0, 0] = 1e37


def _set_params(worker: Any, params: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(worker.engine.module.parameters(), params, strict=True):
            p.copy_(value)


def test_gradient_overflow_with_a_finite_loss_is_skipped(ray_cluster, tiny_model_dir, batch):
    """Plain fp32 without ZeRO (the one path where DeepSpeed leaves the check to us): gradients that overflow
    to inf in the backward, the loss finite, are skipped as `nonfinite_grad` with the state untouched."""
    import ray

    group = LearnerGroup(learner_cfg(zero_stage=0, lr=1e-2), tiny_model_dir)
    algo = AlgorithmConfig()
    try:
        original = snapshot(group)
        ray.get([w.__ray_call__.remote(_overflow_layer0) for w in group.workers])
        before = snapshot(group)
        huge = with_advantages(batch, {i: 1e6 * (1 if i % 2 else -1) for i in range(batch.num_rows)})
        m = group.train_step(huge, algo)
        assert math.isfinite(m["loss"]) and not math.isfinite(m["grad_norm"])
        assert (m["skipped_steps"], m["skipped_nonfinite_grad"], m["optimizer_steps"]) == (1, 1, 0)
        assert_identical(snapshot(group), before)
        ray.get(
            [
                w.__ray_call__.remote(_set_params, s["params"])
                for w, s in zip(group.workers, original, strict=True)
            ]
        )
        good = group.train_step(batch, algo)
        assert good["optimizer_steps"] == 1 and 0 < good["grad_norm"] < 1e6
        assert changed(original, snapshot(group))
    finally:
        group.shutdown()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not alive(pid)


def test_rank_killed_mid_step_raises_learner_failed_and_a_fresh_group_resumes(
    ray_cluster, tiny_model_dir, batch, tmp_path
):
    """SIGKILL of rank 1 while train_step runs: LearnerFailed names rank 1, train_step and the step within
    seconds, the survivor (stuck in a collective) is stopped, every later call fails the same way, shutdown
    works. A fresh group loads the checkpoint saved before. Then a frozen rank (SIGSTOP) hits the deadline."""
    import ray

    cfg = learner_cfg(max_tokens_per_micro_batch=24)  # ZeRO-2, many micro-batches: a step of several seconds
    algo = AlgorithmConfig()
    group = LearnerGroup(cfg, tiny_model_dir, timeout_s=120)
    try:
        group.train_step(batch, algo)
        ckpt = group.save_checkpoint(tmp_path / "ckpt", extra={"step": 1})
        saved = group.compute_logprobs(batch)
        pids = [a["pid"] for a in ray.get([w.address.remote() for w in group.workers])]
        long_batch, _ = compute_advantages(make_table(num_groups=16, group_size=8), algo)
        with ThreadPoolExecutor(1) as pool:
            step = pool.submit(group.train_step, long_batch, algo)
            time.sleep(1.5)
            assert not step.done(), "the step ended before the kill: make it longer"
            os.kill(pids[1], signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(LearnerFailed, match="learner rank 1 died during train_step") as e:
                step.result(timeout=120)
            took = time.monotonic() - killed
        assert (e.value.ranks, e.value.method, e.value.step) == ([1], "train_step", 2)
        assert took < 20, took
        assert wait_gone(pids[0]), "the surviving rank was left running"
        for call in (
            lambda: group.compute_logprobs(batch),
            lambda: group.save_checkpoint(tmp_path / "after"),
            group.state_dict_ref,
            lambda: group.load_checkpoint(ckpt),
            lambda: group.train_step(batch, algo),
        ):
            with pytest.raises(LearnerFailed, match="learner rank 1 had failed in train_step"):
                call()
    finally:
        group.shutdown()
    assert group.workers == [] and group.placement_group is None

    resumed = LearnerGroup(cfg, tiny_model_dir, timeout_s=20)
    try:
        assert resumed.load_checkpoint(ckpt)["extra"] == {"step": 1}
        for a, b in zip(resumed.compute_logprobs(batch), saved, strict=True):
            np.testing.assert_array_equal(a, b)
        pid1 = ray.get(resumed.workers[1].address.remote())["pid"]
        os.kill(pid1, signal.SIGSTOP)  # a frozen rank: no error, no answer
        t0 = time.monotonic()
        with pytest.raises(
            LearnerFailed, match=r"learner ranks \[0, 1\] did not finish compute_logprobs within 20 s"
        ):
            resumed.compute_logprobs(batch)
        assert 19 < time.monotonic() - t0 < 30
    finally:
        resumed.shutdown()
    assert wait_gone(pid1)
