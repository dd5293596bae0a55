"""The registry's rules (one value, versions only go up) and which failures count as a lost replica.

The registry as a named actor that a restarted replica reads is tested on real Ray Serve in
tests/integration/test_replica_faults.py.
"""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

from lightning_ray.weights.recovery import replica_lost
from lightning_ray.weights.registry import Published, WeightRegistry


def test_registry_keeps_the_last_publish_and_refuses_an_older_version():
    reg = WeightRegistry()
    assert reg.current() is None
    reg.publish(3, ["state-3"])
    reg.publish(3, ["state-3b"])  # the same version again (a restore) replaces it
    assert reg.current() == Published(3, ["state-3b"])
    with pytest.raises(ValueError, match="version 2 published after version 3"):
        reg.publish(2, ["state-2"])
    assert reg.current().version == 3
    reg.clear()  # a new deployment starts on the model folder's weights
    assert reg.current() is None
    reg.publish(0, ["state-0"])
    assert reg.current().version == 0


class EngineDeadError(RuntimeError):
    """Named as vLLM names the error of a replica whose engine process died."""


def task_error(cause: Exception) -> RayTaskError:
    return RayTaskError("generate", "traceback", cause)


@pytest.mark.parametrize(
    "err",
    [
        ActorDiedError(),
        ActorUnavailableError("unreachable", None),
        ReplicaUnavailableError("abc"),
        task_error(EngineDeadError("engine core died")),
    ],
)
def test_a_dead_replica_or_engine_is_a_lost_replica(err):
    assert replica_lost(err)


@pytest.mark.parametrize(
    "err",
    [task_error(ValueError("prompt has 2000 tokens")), ValueError("bad"), TimeoutError("slow")],
)
def test_an_answer_the_engine_refused_is_not_a_lost_replica(err):
    assert not replica_lost(err)
