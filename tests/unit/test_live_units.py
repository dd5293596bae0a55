"""Live learning without Ray: the live pool's groups and leases, the judge's rating, the config's errors and
`serve --learn` on the command line."""

from __future__ import annotations

import asyncio

import pytest

from lightning_ray import cli
from lightning_ray.config import ConfigError, load_config
from lightning_ray.live.pool import LivePool
from lightning_ray.live.run import live_config
from lightning_ray.live.scorer import judge_rating, load_scorer
from lightning_ray.tasks.dataset import Task


def test_live_pool_leases_each_traffic_group_to_the_gateway_and_draws_nothing():
    pool = LivePool(group_size=3, max_attempts=1, lease_timeout_s=60.0)
    assert pool.start_live_group(Task("live-a", {})) == []  # no stream open yet: a singleton
    batch = pool.open_batch(3)
    assert pool.add_groups(batch, 5) == []  # the loop's admission draws no dataset tasks
    leases = pool.start_live_group(Task("live-a", {"prompt": "p"}))
    assert [lease.index_in_group for lease in leases] == [0, 1, 2]
    assert {lease.group_id for lease in leases} == {leases[0].group_id}
    assert all(lease.task == {"prompt": "p"} for lease in leases)
    assert pool.stats()["leased"] == 3
    assert pool.close_batch(batch, "run ended") == 3  # the rollouts waiting for rewards end with the run
    assert pool.batch_done(batch)


def test_judge_rating_takes_the_first_number_clipped():
    assert judge_rating("0.8") == 0.8
    assert judge_rating("Score: 7 out of 10") == 1.0
    assert judge_rating("-2") == 0.0
    with pytest.raises(ValueError, match="no number"):
        judge_rating("great answer")


def test_live_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="live.scorer and live.judge_url"):
        load_config(None, ["live.scorer=a:b", "live.judge_url=http://x/v1"], check_files=False)
    with pytest.raises(ConfigError, match="live.scorer"):
        load_config(None, ["live.scorer=nocolon"], check_files=False)
    with pytest.raises(ConfigError, match="live.group_size"):
        load_config(None, ["live.group_size=1"], check_files=False)
    with pytest.raises(ConfigError, match=r"live.group_fraction=0.25 needs live.scorer"):
        live_config(load_config(None, [], check_files=False))
    cfg = live_config(
        load_config(None, ["live.scorer=tests.live_scorers:half", "live.group_size=3"], check_files=False)
    )
    assert cfg.algorithm.group_size == 3
    with pytest.raises(ConfigError, match="live.scorer: .*cannot import module 'no_such_module'"):
        load_scorer(load_config(None, ["live.scorer=no_such_module:f"], check_files=False).live)


def test_a_scorer_is_called_off_the_event_loop():
    scorer = load_scorer(load_config(None, ["live.scorer=tests.live_scorers:half"], check_files=False).live)
    assert asyncio.run(scorer("prompt", "answer")) == 0.5


def test_serve_learn_on_the_command_line():
    args = cli.parse_args(["serve", "x.yaml", "--learn", "live.group_size=2"])
    assert args.learn and args.overrides == ["live.group_size=2"]
    assert not cli.parse_args(["serve", "x.yaml"]).learn
