"""The cluster recipes expose nothing unauthenticated: the launcher's dashboard (and Jobs API) binds loopback on
the head and every node runs Ray with token authentication; the KubeRay job turns on token auth and keeps the
head's Service inside the cluster. What can be checked offline is: the launcher config against Ray's schema, and
every `lightning-ray` command the recipes show (a dry run: it parses and its config validates)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from lightning_ray.cli import parse_args
from lightning_ray.config import load_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_starts(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def test_launcher_dashboard_on_loopback_and_token_auth_everywhere():
    cfg = load("ray-cluster.yaml")
    head, workers = ray_starts(cfg["head_start_ray_commands"]), ray_starts(cfg["worker_start_ray_commands"])
    assert head and workers
    for cmd in head:
        host = re.search(r"--dashboard-host[= ](\S+)", cmd)
        assert host is not None and host.group(1) in ("127.0.0.1", "localhost"), cmd
        assert "--include-dashboard=false" not in cmd  # the Jobs API lives in the dashboard
    for cmd in head + workers:
        assert re.search(r"\bRAY_AUTH_MODE=token\b", cmd), f"ray start without token auth: {cmd}"
    # every node gets the token file that `ray get-auth-token --generate` wrote on the user's machine
    assert "~/.ray/auth_token" in cfg.get("file_mounts", {})
    assert "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265" in (
        CLUSTER / "ray-cluster.yaml"
    ).read_text().replace("\\\n", "")


def test_kuberay_job_needs_a_token_and_stays_in_the_cluster():
    job = load("kuberay-rayjob.yaml")
    assert job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    major, minor, *_ = (int(p) for p in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray >= 2.52"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    for group in [head, *spec["workerGroupSpecs"]]:
        env = [e for c in group["template"]["spec"]["containers"] for e in c.get("env", [])]
        assert not any(e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token" for e in env)
        assert not any(e["name"] == "RAY_AUTH_TOKEN" and "value" in e for e in env), "a token in the manifest"
    assert "lightning-ray train" in job["spec"]["entrypoint"]


def test_launcher_config_passes_the_cluster_launchers_schema():
    """What `ray up` checks first, offline: the launcher's defaults filled in, then Ray's JSON schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load("ray-cluster.yaml")))


def commands_in(text: str) -> list[list[str]]:
    """Every `lightning-ray ...` command line in `text` (after a `--`, a line continuation joined), as words."""
    text = text.replace("\\\n", " ")
    found = re.findall(
        r"(?:^[#\s]*|--[#\s]+)(lightning-ray (?:check|serve|rollout|train)\b[^\n#`']*)", text, re.M
    )
    return [shlex.split(m) for m in found]


def test_the_recipes_commands_and_overrides_are_valid():
    """A dry run of every `lightning-ray` command the recipes show: the command line parses, and its config file
    with its overrides validates (the RayJob's GPU overrides included)."""
    texts = [(CLUSTER / name).read_text() for name in ("ray-cluster.yaml", "README.md")]
    commands = [c for text in texts for c in commands_in(text)]
    commands.append(shlex.split(load("kuberay-rayjob.yaml")["spec"]["entrypoint"]))
    assert len(commands) >= 3
    for words in commands:
        assert words[0] == "lightning-ray", words
        args = parse_args(words[1:])
        load_config(CLUSTER.parent / args.config, args.overrides)
