"""`placement` per role (inference, learner, rollout): custom resources and node labels, validated against the
cluster's nodes before anything starts, with an error naming the role that cannot be placed. The nodes here are
`ray.nodes()`-shaped dicts; tests/integration/test_placement_cluster.py checks a real multi-node cluster."""

from __future__ import annotations

import pytest

from lightning_ray.config import ConfigError, Placement, load_config
from lightning_ray.resources import PlacementError, check_placement
from lightning_ray.runtime import check_local


def node(address: str, resources: dict[str, float], labels: dict[str, str] | None = None, alive: bool = True):
    return {
        "NodeID": address.replace(".", "") * 4,
        "NodeManagerAddress": address,
        "Alive": alive,
        "Resources": {"CPU": 4.0, "memory": 1e9, **resources},
        "Labels": {"ray.io/node-id": "x", **(labels or {})},
    }


NODES = [
    node("10.0.0.1", {"inference_node": 1.0}),
    node("10.0.0.2", {"learner_node": 1.0}, {"pool": "train"}),
    node("10.0.0.3", {"rollout_node": 2.0}),
    node("10.0.0.4", {"rollout_node": 8.0}, alive=False),
]


def placed(*overrides: str):
    return load_config(
        None,
        [
            "inference.placement.resources={inference_node: 0.5}",
            "learner.placement={resources: {learner_node: 1}, labels: {pool: train}}",
            "rollout.placement.resources={rollout_node: 1}",
            "rollout.num_workers=2",
            *overrides,
        ],
        check_files=False,
    )


def test_each_role_fits_its_nodes():
    check_placement(placed(), NODES)
    check_placement(load_config(None, check_files=False), NODES)  # no placement: any node


@pytest.mark.parametrize(
    ("override", "words"),
    [
        (
            "rollout.num_workers=3",
            "rollout.placement: 3 actor(s) each needing CPU=0.25, rollout_node=1, but the "
            "nodes that match hold 2",
        ),  # the dead node's 8 do not count
        (
            "learner.placement.labels={pool: eval}",
            "learner.placement: 1 actor(s) each needing CPU=1, learner_node=1, "
            "label pool=eval, but the nodes that match hold 0",
        ),
        (
            "inference.placement.resources={gpu_node: 1}",
            "inference.placement: 1 actor(s) each needing CPU=1, gpu_node=1",
        ),
        (
            "inference.num_cpus_per_replica=8",
            "inference.placement: 1 actor(s) each needing CPU=8, inference_node=0.5",
        ),
    ],
)
def test_a_role_that_cannot_be_placed_is_named(override, words):
    with pytest.raises(PlacementError) as info:
        check_placement(placed(override), NODES)
    text = str(info.value)
    assert "cannot be placed on this cluster" in text and words in text, text
    assert (
        "10.0.0.2 (10002100): resources {'CPU': 4.0, 'learner_node': 1.0}, labels {'pool': 'train'}" in text
    )


def test_placement_fields_are_validated(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learner: {placement: {resources: {CPU: 2}}}\n")
    with pytest.raises(
        ConfigError, match=r"run.yaml:\n  learner.placement.resources: .*'CPU' is set by num_cpus"
    ):
        load_config(path, check_files=False)
    with pytest.raises(ConfigError, match=r"rollout.placement.resources: .*must be > 0"):
        load_config(None, ["rollout.placement.resources={x: 0}"], check_files=False)
    with pytest.raises(ConfigError, match=r"inference.placement.nodes: unknown field"):
        load_config(None, ["inference.placement.nodes=[a]"], check_files=False)
    assert Placement(resources={"a": 1}, labels={"k": "v"}).actor_options() == {
        "resources": {"a": 1.0},
        "label_selector": {"k": "v"},
    }
    assert Placement().actor_options() == {}


def test_check_without_a_cluster_sees_one_plain_node():
    with pytest.raises(
        PlacementError, match="rollout.placement: 2 actor.s. each needing CPU=0.25, rollout_node=1"
    ):
        check_local(placed("ray.num_cpus=8"))
