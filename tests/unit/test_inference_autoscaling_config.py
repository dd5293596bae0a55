"""`inference.autoscaling`: Ray Serve's own autoscaling fields, checked when the config loads, each error naming
the field; what the deployment gets; the registry's record of what each starting replica read."""

from __future__ import annotations

import pytest

from lightning_ray.config import ConfigError, load_config
from lightning_ray.inference.server import inference_app
from lightning_ray.weights.registry import WeightRegistry


def config(*overrides: str):
    return load_config(None, list(overrides), check_files=False)


def test_autoscaling_passes_through_to_serve_instead_of_num_replicas():
    cfg = config("inference.autoscaling={min_replicas: 1, max_replicas: 3, initial_replicas: 2}")
    assert cfg.inference.starting_replicas() == 2
    options = inference_app("/model", cfg.model, cfg.inference)._bound_deployment._deployment_config
    assert options.autoscaling_config.max_replicas == 3
    assert options.autoscaling_config.initial_replicas == 2
    started = config("inference.num_replicas=2", "inference.autoscaling={max_replicas: 4}").inference
    assert started.serve_autoscaling() == {"initial_replicas": 2, "max_replicas": 4}
    assert started.starting_replicas() == 2
    fixed = config("inference.num_replicas=2").inference
    assert fixed.starting_replicas() == 2
    assert inference_app("/model", cfg.model, fixed)._bound_deployment._deployment_config.num_replicas == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["inference.autoscaling={max_replica: 2}"], "inference.autoscaling.max_replica: not a Ray Serve"),
        (["inference.autoscaling={min_replicas: 3, max_replicas: 2}"], "max_replicas (2) must be greater"),
        (["inference.autoscaling={max_replicas: many}"], "inference.autoscaling.max_replicas: Input should"),
        (
            ["inference.autoscaling={min_replicas: 0, max_replicas: 2}"],
            "inference.autoscaling.min_replicas: 0",
        ),
        (
            ["inference.num_replicas=2", "inference.autoscaling={max_replicas: 2, initial_replicas: 1}"],
            "inference.num_replicas and inference.autoscaling.initial_replicas are both set",
        ),
        (
            ["inference.num_replicas=3", "inference.autoscaling={max_replicas: 2}"],
            "(inference.num_replicas=3 is the initial_replicas)",
        ),
    ],
)
def test_a_wrong_autoscaling_field_is_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        config(*overrides)
    assert message in str(err.value)


def test_registry_records_the_version_each_starting_replica_read():
    reg = WeightRegistry()
    assert reg.current_for("a", 0) is None
    reg.publish(2, ["state-2"])
    assert reg.current_for("b", 1).version == 2
    assert reg.started_versions() == {"a": 0, "b": 1}
    reg.current_for("b", 2)
    assert reg.started_versions() == {"a": 0, "b": 2}
    reg.clear()
    assert reg.started_versions() == {}


def test_placement_and_tensor_parallel_bundles_apply_to_every_autoscaled_replica():
    cfg = config(
        "inference.autoscaling={max_replicas: 3}",
        "inference.tensor_parallel_size=2",
        "inference.num_gpus_per_replica=2",
        "inference.placement={resources: {inference_node: 0.01}, labels: {pool: a}}",
    )
    deployment = inference_app("/model", cfg.model, cfg.inference)._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    replica = deployment._replica_config
    assert replica.placement_group_bundles == [{"CPU": 1.0, "inference_node": 0.01}, {"GPU": 1}, {"GPU": 1}]
    assert replica.placement_group_strategy == "STRICT_PACK"
    assert replica.placement_group_bundle_label_selector == [{"pool": "a"}] * 3
