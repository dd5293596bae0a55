"""`--resume` loads only safe formats: weights from safetensors, the DeepSpeed engine state (a `torch.save`
pickle) with `torch.load(weights_only=True)`.

A pickle can run any code while it loads, and a run directory may come from elsewhere. `weights_only`
unpickles tensors, numbers, strings and containers only; DeepSpeed's engine state also holds three plain data
types of its own (`DEEPSPEED_GLOBALS`), allowed by name. `unsafe_files` finds a file that would need anything
else before Ray starts (`resume_plan`), and `weights_only_load` is what the learner loads the engine state
with, so a file swapped in afterwards is refused too.
"""

from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PICKLE_MAGIC = b"\x80"  # the PROTO opcode that starts a pickle of protocol 2 or later
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # the loss scale (a few numbers)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an int enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints
)


class UnsafeCheckpointFile(ValueError):
    """A checkpoint file that loading would have to unpickle arbitrary objects from."""


def unsafe_files(folder: Path) -> list[str]:
    """Why each pickle-format file under `folder` cannot be loaded with `weights_only`, one line per file."""
    problems = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)):
        problem = _pickle_problem(path)
        if problem is not None:
            problems.append(f"{path.relative_to(folder).as_posix()}: {problem}")
    return problems


def _pickle_problem(path: Path) -> str | None:
    if zipfile.is_zipfile(path):
        from torch.serialization import get_unsafe_globals_in_checkpoint

        try:
            found = get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # noqa: BLE001 - a file torch cannot read is named, not loaded
            return f"not a readable torch.save file ({type(err).__name__}: {err})"
        unsafe = sorted(set(found) - set(DEEPSPEED_GLOBALS))
        if unsafe:
            return f"a pickle that needs {', '.join(unsafe)} (only tensors and plain data are loaded)"
        return None
    with path.open("rb") as f:
        if f.read(1) == PICKLE_MAGIC:
            return "a raw pickle, not a torch.save zip file: not loaded (it could run code)"
    return None  # not a pickle at all: the checkpoint's manifest says whether it is intact


def weights_only_load(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` allowing `DEEPSPEED_GLOBALS`; `UnsafeCheckpointFile` naming the file
    and what it wanted instead of loading anything else."""
    import pickle

    import torch

    with torch.serialization.safe_globals(_deepspeed_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UnsafeCheckpointFile(f"{path}: refused to load, it is not weights only: {reason}") from None


def _deepspeed_types() -> list[type]:
    types = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        types.append(getattr(importlib.import_module(module), attr))
    return types
