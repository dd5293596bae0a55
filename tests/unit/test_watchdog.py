"""The watchdog on plain counters: progress keeps a run alive, a stall stops it with a named cause."""

from __future__ import annotations

import itertools
import time

import pytest

from lightning_ray.faults import RunStalled, stall_check
from lightning_ray.monitor.watchdog import Watchdog


def test_counters_that_move_keep_the_run_going(tmp_path):
    ticks = itertools.count()
    dog = Watchdog(tmp_path, timeout_s=1.0, probes={"calls": lambda: next(ticks)})
    with dog.watching():
        time.sleep(2.5)
    assert dog.tripped is None and not (tmp_path / "stalls").exists()


def test_the_driver_beating_is_progress(tmp_path):
    dog = Watchdog(tmp_path, timeout_s=1.0, probes={"calls": lambda: 0})
    with dog.watching():
        for _ in range(10):
            time.sleep(0.25)
            dog.beat()
    assert dog.tripped is None


def test_a_stall_interrupts_the_wait_as_run_stalled_and_says_why(tmp_path):
    def broken() -> int:
        raise ConnectionError("pool gone")

    dog = Watchdog(tmp_path, timeout_s=1.0, probes={"calls": lambda: 7, "rollouts ended": broken})
    t0 = time.monotonic()
    with pytest.raises(RunStalled, match="nothing progressed for") as err, dog.watching():
        time.sleep(60)  # interrupted
    assert time.monotonic() - t0 < 20
    [stall] = list((tmp_path / "stalls").iterdir())
    cause = (stall / "cause.txt").read_text()
    assert "calls=7" in cause and "no answer (ConnectionError: pool gone)" in cause
    assert str(stall) in str(err.value)
    assert "test_a_stall_interrupts" in (stall / "driver.txt").read_text()


def test_a_wait_loop_ends_in_run_stalled_once_its_counters_stand_still():
    counter = iter([0, 1, 2, 3])  # moves on the first reads, then stands still at 3
    value = {"now": 0}

    def read() -> str:
        value["now"] = next(counter, value["now"])
        return f"{value['now']} rollouts ended"

    check = stall_check("rollout train: the batch", timeout_s=1.0, read=read)
    t0 = time.monotonic()
    with pytest.raises(RunStalled, match=r"rollout train: the batch: nothing progressed for 1 s") as err:
        while time.monotonic() - t0 < 30:
            check()
            time.sleep(0.05)
    assert 2.0 <= time.monotonic() - t0 < 4.0  # 3 moves at 0.5 s reads, then 1 s without one
    assert "trainer.stall_timeout_s=1" in str(err.value) and "it stayed at 3 rollouts ended" in str(err.value)
