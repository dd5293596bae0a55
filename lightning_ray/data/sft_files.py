"""SFT's data from earlier runs (`sft.source: files`): their trajectories Parquet, selected and batched by step.

`load_sft_files` reads every call table `sft.files` names (the schema the loop writes, `TRANSITION_SCHEMA`),
each rollout once (the first file that holds it), with `sft.trained_only` only those the source run's
`ledger.jsonl` says were trained, and keeps what `select_best` keeps: succeeded rollouts whose reward reaches
`sft.min_reward`, at most `sft.per_group` of each group. Every problem is a `ConfigError` naming the field and
the file, raised before anything starts.

An epoch is the selected rollouts in an order drawn from (`trainer.seed`, epoch) when `data.shuffle`, cut into
batches of `sft.batch_size` (the last may be smaller); the steps go through one epoch after the other. A step's
batch depends on its number only, so a resumed run trains exactly what the killed one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lightning_ray.algorithms.sft import select_best
from lightning_ray.config import Config, ConfigError
from lightning_ray.config.sft import source_paths
from lightning_ray.data.schema import TRANSITION_SCHEMA
from lightning_ray.rollouts.ledger import read_ledger


@dataclass
class SftFiles:
    """The selected calls, and their rollouts in the order they were read."""

    calls: pa.Table
    rollout_ids: list[str]
    stats: dict[str, Any]  # files and rollouts read, rollouts and groups kept, their mean reward

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.rollout_ids) / batch_size)

    def batch(
        self, step: int, batch_size: int, seed: int, shuffle: bool
    ) -> tuple[pa.Table, dict[str, float]]:
        """Step `step`'s calls, and where it is in the data: `sft/epoch` (passes done, fractional) and
        `sft/rollouts` (the step's; an epoch's last batch may hold fewer)."""
        n, per_epoch = len(self.rollout_ids), self.batches_per_epoch(batch_size)
        epoch, index = divmod(step - 1, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        picked = order[index * batch_size : (index + 1) * batch_size]
        ids = pa.array([self.rollout_ids[i] for i in picked], pa.string())
        calls = self.calls.filter(pc.is_in(self.calls.column("rollout_id"), value_set=ids))
        return calls, {"sft/epoch": step / per_epoch, "sft/rollouts": len(picked)}


def load_sft_files(cfg: Config) -> SftFiles:
    """Read and select what `cfg.sft` names (see the module docstring)."""
    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    try:
        sources = source_paths(cfg.sft, base)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    tables, seen, read = [], pa.array([], pa.string()), 0
    for where, files in sources:
        for path in files:
            table = read_calls(path, where)
            if cfg.sft.trained_only:
                trained = pa.array(sorted(trained_rollouts(path)), pa.string())
                table = table.filter(pc.is_in(table.column("rollout_id"), value_set=trained))
            table = table.filter(pc.invert(pc.is_in(table.column("rollout_id"), value_set=seen)))
            seen = pa.concat_arrays([seen, pc.unique(table.column("rollout_id"))])
            tables.append(table)
            read += 1
    calls = pa.concat_tables(tables)
    kept, _, stats = select_best(calls, cfg.sft.min_reward, cfg.sft.per_group)
    if not stats["rollouts_kept"]:
        raise ConfigError(
            f"sft.min_reward: no rollout of sft.files ({stats['rollouts']} read from {read} files"
            f"{', trained ones only' if cfg.sft.trained_only else ''}) succeeded with a reward of at least "
            f"{cfg.sft.min_reward}"
        )
    ids = kept.column("rollout_id").combine_chunks().dictionary_encode().dictionary.to_pylist()
    return SftFiles(kept, ids, {"files": read, **stats})


def read_calls(path: Path, where: str) -> pa.Table:
    """A trajectories call table in `TRANSITION_SCHEMA` (merged runs' extra columns dropped)."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"{where}: {path} is not a readable Parquet file: {e}") from None
    missing = [name for name in TRANSITION_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ConfigError(f"{where}: {path} is not a trajectories call table: no column {', '.join(missing)}")
    try:
        return table.select(TRANSITION_SCHEMA.names).cast(TRANSITION_SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise ConfigError(f"{where}: {path} does not have the trajectories schema: {e}") from None


def trained_rollouts(path: Path) -> frozenset[str]:
    """The rollouts the ledger of `path`'s run directory (RUN_DIR/trajectories/FILE) says were trained."""
    ledger = path.parent.parent / "ledger.jsonl"
    if not ledger.is_file():
        raise ConfigError(f"sft.trained_only: {path} has no ledger.jsonl in its run directory ({ledger})")
    return _trained(ledger)


@cache
def _trained(ledger: Path) -> frozenset[str]:
    return frozenset(e["rollout_id"] for e in read_ledger(ledger) if e["outcome"] == "trained")
