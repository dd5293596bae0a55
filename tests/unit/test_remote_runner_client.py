"""The remote runner's side that needs no run: its config rule, its command line, and a runner whose gateway
does not answer (it gives up after `patience_s`, naming the URL)."""

from __future__ import annotations

import socket

import pytest

import lightning_ray as lr
from lightning_ray import cli
from lightning_ray.config import ConfigError, load_config
from lightning_ray.runners.client import RunnerGone


def test_runners_off_loopback_need_the_gateway_token():
    with pytest.raises(ConfigError, match="runners.host='0.0.0.0' is not loopback: set gateway.auth_token"):
        load_config(None, ["gateway.runners.enabled=true", "gateway.runners.host=0.0.0.0"], check_files=False)
    cfg = load_config(
        None,
        ["gateway.runners.enabled=true", "gateway.runners.host=0.0.0.0", "gateway.auth_token=t"],
        check_files=False,
    )
    assert cfg.gateway.runners.host == "0.0.0.0" and cfg.gateway.host == "127.0.0.1"


def test_runner_command_line(monkeypatch):
    monkeypatch.setenv("LIGHTNING_RAY_TOKEN", "from-env")
    args = cli.parse_args(
        ["runner", "http://h:1", "--agent", "m:f", "--concurrency", "4", "--max-rollouts", "2"]
    )
    assert (args.url, args.agent, args.token, args.concurrency, args.max_rollouts) == (
        "http://h:1",
        "m:f",
        "from-env",
        4,
        2,
    )
    with pytest.raises(SystemExit):
        cli.parse_args(
            ["runner", "http://h:1", "--agent", "m:f", "trainer.steps=3"]
        )  # no config, no overrides


def test_a_runner_whose_gateway_does_not_answer_gives_up_naming_it(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    runner = lr.RemoteRunner(url, patience_s=1.0)
    with pytest.raises(RunnerGone, match=url):
        runner.run("tests.runner_agents:emitting_agent")
    assert cli.main(["runner", url, "--agent", "tests.runner_agents:emitting_agent", "--patience", "1"]) == 1
    assert f"no train run answers at {url}" in capsys.readouterr().err
