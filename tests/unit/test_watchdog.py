"""The watchdog on plain counters: progress keeps a run alive, a stall stops it with a named cause."""

from __future__ import annotations

import itertools
import time

import pytest

from lightning_ray.faults import RunStalled
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
