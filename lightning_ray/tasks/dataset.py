"""Read a task dataset: JSONL, Parquet, or a directory written by HF `datasets.save_to_disk`.

Every row becomes a `Task` with a stable `task_id`: the row's `id` field when present, else its row index
(0-based, counting data rows only, so blank lines do not shift it). Bad rows fail with the file and the
line (JSONL) or row (Parquet/Arrow) named. A saved HF dataset is read with pyarrow alone: it is a folder of
Arrow IPC stream files listed in `state.json`, so the `datasets` package is not needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and the line or row."""


@dataclass(frozen=True)
class Task:
    task_id: str
    data: dict[str, Any]


def _task_id(row: dict[str, Any], index: int, where: str, id_field: str) -> str:
    value = row.get(id_field)
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DatasetError(
            f"{where}: field {id_field!r} must be a string or an integer, got {type(value).__name__}"
        )
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise DatasetError(f"{where}: field {id_field!r} must be a string or an integer, got {value!r}")
        value = int(value)
    text = str(value)
    if not text.strip():
        raise DatasetError(f"{where}: field {id_field!r} is empty")
    return text


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    return rows


def _rows_of_table(table: pa.Table, path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_saved_hf(directory: Path) -> list[tuple[str, dict[str, Any]]]:
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        raise DatasetError(
            f"{directory}: holds a DatasetDict with splits {splits}; point at one split, e.g. {directory / 'train'}"
        )
    state_file = directory / "state.json"
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
            names = [entry["filename"] for entry in state["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(f"{state_file}: not a `datasets` state file ({e})") from None
        files = [directory / name for name in names]
    else:
        files = sorted(directory.glob("*.arrow"))
    if not files:
        raise DatasetError(
            f"{directory}: no Arrow files (expected a folder written by datasets.save_to_disk)"
        )
    rows = []
    for file in files:
        if not file.is_file():
            raise DatasetError(f"{file}: listed in {state_file.name} but missing")
        try:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid as e:
            raise DatasetError(f"{file}: not an Arrow IPC stream: {e}") from None
        rows.extend(_rows_of_table(table, file))
    return rows


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    if path.is_dir():
        return _read_saved_hf(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".parquet", ".pq"):
        try:
            return _rows_of_table(pq.read_table(path), path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"{path}: not a readable Parquet file: {e}") from None
    raise DatasetError(
        f"{path}: unknown dataset format {suffix!r} (use .jsonl, .parquet or a save_to_disk folder)"
    )


def load_tasks(path: str | Path, id_field: str = "id") -> list[Task]:
    """Read every row of a dataset as a Task; raises DatasetError naming the file and line/row of a bad row."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the dataset has no rows")
    tasks: list[Task] = []
    first_seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        task_id = _task_id(row, index, where, id_field)
        if task_id in first_seen:
            raise DatasetError(
                f"{where}: task id {task_id!r} already used at {first_seen[task_id]} "
                f"(ids come from the {id_field!r} field, else the row index)"
            )
        first_seen[task_id] = where
        tasks.append(Task(task_id=task_id, data=row))
    return tasks
