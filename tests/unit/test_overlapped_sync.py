"""`OverlappedSync.check`: a weight sync that failed on its thread stops the run while the stream waits."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from lightning_ray.weights import OverlappedSync


def sync_in_progress() -> OverlappedSync:
    # no learners or replicas: only the sync in progress matters here
    sync = OverlappedSync.__new__(OverlappedSync)
    sync.pending = Future()
    return sync


def test_check_raises_the_failure_of_a_sync_that_ended_in_one():
    sync = sync_in_progress()
    sync.check()  # still loading: nothing to raise
    sync.pending.set_exception(RuntimeError("replica 0 could not load version 3"))
    with pytest.raises(RuntimeError, match="version 3"):
        sync.check()


def test_check_leaves_a_sync_that_ended_well_to_finish():
    sync = sync_in_progress()
    sync.pending.set_result([{"replica": 0, "version": 3}])
    sync.check()
    assert sync.finish() == [{"replica": 0, "version": 3}]
    sync.check()  # none in progress
