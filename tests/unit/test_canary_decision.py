"""`inference.canary`: the promote / rollback / wait rule and the numbers behind it, how many replicas take a
candidate first, and the config's checks (each error naming the field)."""

from __future__ import annotations

import pytest

from lightning_ray.config import ConfigError, load_config
from lightning_ray.config.inference import CanaryConfig
from lightning_ray.inference.canary import canary_count, judge, model_folder_state
from lightning_ray.live.run import live_config
from lightning_ray.loop import train

CFG = CanaryConfig(share=0.25, margin=0.25, min_rewards=4, max_wait_s=60.0)


def test_promotes_when_not_worse_than_current_by_more_than_the_margin():
    d = judge(CFG, (3, 4), [1.0, 1.0, 1.0, 1.0, 0.5], [1.0, 0.5, 1.0, 0.5], waited_s=5.0)
    assert (d.decision, d.current_version, d.candidate_version) == ("promote", 3, 4)
    assert (d.current_mean, d.candidate_mean, d.current_count, d.candidate_count) == (0.9, 0.75, 5, 4)
    assert d.difference == pytest.approx(-0.15) and d.margin == 0.25
    assert d.difference_stderr is not None and d.difference_stderr > 0


def test_rolls_back_when_worse_by_more_than_the_margin():
    d = judge(CFG, (3, 4), [1.0] * 5, [1.0, 1.0, 0.0, 0.0], waited_s=5.0)
    assert d.decision == "rollback"
    assert d.difference == pytest.approx(-0.5)
    assert "< -margin" in d.reason


def test_waits_for_min_rewards_of_both_versions_then_rolls_back_after_max_wait():
    assert judge(CFG, (0, 1), [1.0] * 10, [1.0] * 3, waited_s=59.0).decision == "wait"
    late = judge(CFG, (0, 1), [1.0] * 10, [1.0] * 3, waited_s=60.0)
    assert late.decision == "rollback" and "max_wait_s" in late.reason
    empty = judge(CFG, (0, 1), [], [], waited_s=1.0)
    assert (empty.decision, empty.current_mean, empty.difference, empty.difference_stderr) == (
        "wait",
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("share", "replicas", "count"), [(0.25, 2, 1), (0.25, 8, 2), (0.3, 4, 2), (0.9, 2, 1)]
)
def test_canary_share_is_at_least_one_replica_and_never_all(share, replicas, count):
    assert canary_count(share, replicas) == count


def test_one_replica_cannot_hold_a_canary():
    with pytest.raises(RuntimeError, match="inference.canary: needs at least 2 replicas"):
        canary_count(0.25, 1)


def test_starting_weights_must_be_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="inference.canary: the model folder .* no \\*.safetensors"):
        model_folder_state(str(tmp_path))


def config(*overrides: str):
    return load_config(None, list(overrides), check_files=False)


def test_canary_is_off_by_default_and_validated():
    assert config().inference.canary is None
    on = config("inference.canary={}", "inference.num_replicas=2").inference.canary
    assert (on.share, on.margin, on.min_rewards) == (0.25, 0.05, 20)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["inference.canary={}"],
            "inference.canary: needs at least 2 replicas .* inference.num_replicas is 1",
        ),
        (
            ["inference.canary={}", "inference.num_replicas=2", "inference.autoscaling={max_replicas: 3}"],
            "inference.autoscaling.min_replicas is 1",
        ),
        (["inference.canary={share: 1}", "inference.num_replicas=2"], "inference.canary.share"),
        (["inference.canary={margin: -0.1}", "inference.num_replicas=2"], "inference.canary.margin"),
        (["inference.canary={min_reward: 3}", "inference.num_replicas=2"], "inference.canary.min_reward"),
    ],
)
def test_bad_canary_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def test_train_refuses_a_canary_before_anything_starts_and_serve_learn_takes_it(tmp_path):
    cfg = config("inference.canary={}", "inference.num_replicas=2", "live.scorer=tests.live_scorers:half")
    with pytest.raises(ConfigError, match="inference.canary: `lightning-ray train` has no live traffic"):
        train(cfg, resume=str(tmp_path / "no-such-run"))  # refused before the resume folder is even read
    assert live_config(cfg).inference.canary == cfg.inference.canary
