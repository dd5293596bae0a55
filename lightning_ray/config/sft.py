"""The `sft:` section: where supervised fine-tuning (`algorithm.name: sft`) takes its trajectories from.

Two sources, one selection. `rollouts` samples `algorithm.group_size` rollouts per task through the rollout
stack as GRPO does and keeps the best of each group (rejection sampling); `files` reads the trajectories
Parquet of earlier runs. Either way a rollout trains only when its reward reaches `min_reward`, and at most
`per_group` rollouts of a group do, the best first (`lightning_ray.algorithms.sft.select_best`).
"""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from lightning_ray.config.sections import Section

ROLLOUTS_SUFFIX = "-rollouts.parquet"  # a run's per-rollout tables, beside its call tables


class SftConfig(Section):
    source: Literal["rollouts", "files"] = Field(
        "rollouts",
        description="rollouts: sample algorithm.group_size rollouts per task and keep the best (rejection "
        "sampling); files: the trajectories Parquet listed in `files`.",
    )
    files: list[str] = Field(
        default_factory=list,
        description="source: files. Run directories (their trajectories/step-*.parquet and "
        "rollout-transitions.parquet), trajectories Parquet files, or glob patterns of either.",
    )
    min_reward: float = Field(1.0, description="A rollout trains only when its reward reaches this.")
    per_group: int | None = Field(
        1, gt=0, description="The most rollouts of one group that train, the best first; null: all that pass."
    )
    trained_only: bool = Field(
        False, description="source: files. Only rollouts the source run's ledger.jsonl says were trained."
    )
    batch_size: int = Field(32, gt=0, description="source: files. Rollouts per learner step.")
    epochs: float | None = Field(
        None,
        gt=0,
        description="source: files. Passes over the selected rollouts; sets the number of steps "
        "(epochs x ceil(rollouts / batch_size)) in place of trainer.steps.",
    )


def sft_steps(cfg: SftConfig, num_rollouts: int, steps: int) -> int:
    """The run's steps: `trainer.steps`, or with `sft.epochs` as many as those passes take (an epoch is
    ceil(rollouts / batch_size) steps)."""
    if cfg.epochs is None:
        return steps
    return max(1, math.ceil(cfg.epochs * math.ceil(num_rollouts / cfg.batch_size)))


def source_paths(cfg: SftConfig, base: Path) -> list[tuple[str, list[Path]]]:
    """Each `sft.files` entry's field name and the Parquet files it names, in order. An entry that names
    nothing is an error naming the field (`FileNotFoundError`). Relative paths are taken from the working
    directory when they exist there, else from `base` (the config's folder)."""
    out = []
    for i, entry in enumerate(cfg.files):
        where = f"sft.files[{i}]"
        path = Path(entry).expanduser()
        if not path.is_absolute() and not glob.glob(str(path)):
            path = base / path
        matches = [path]
        if glob.has_magic(str(path)):  # a pattern's step-N-rollouts.parquet are no call tables: skipped
            matches = [Path(p) for p in sorted(glob.glob(str(path))) if not p.endswith(ROLLOUTS_SUFFIX)]
        if not matches or not all(p.exists() for p in matches):
            raise FileNotFoundError(f"{where}: no such file or directory: {entry}")
        files = [f for p in matches for f in (run_files(p) if p.is_dir() else [p])]
        if not files:
            raise FileNotFoundError(
                f"{where}: {entry} holds no trajectories Parquet (trajectories/step-*.parquet or "
                "trajectories/rollout-transitions.parquet)"
            )
        out.append((where, files))
    return out


def run_files(run_dir: Path) -> list[Path]:
    """The call tables of a run directory: each step's, and a `lightning-ray rollout` run's."""
    trajectories = run_dir / "trajectories"
    steps = [p for p in sorted(trajectories.glob("step-*.parquet")) if not p.name.endswith(ROLLOUTS_SUFFIX)]
    single = trajectories / "rollout-transitions.parquet"
    return steps + ([single] if single.is_file() else [])
