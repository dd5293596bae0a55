"""The watchdog: a run in which nothing progresses stops with a named cause and the stacks of its actors.

A thread of the driver reads the run's progress counters every few seconds: LLM calls the gateways recorded
(`RolloutWorker.progress`, answered on a control thread even when an agent blocks the worker), rollouts the
task pool saw end, and the driver's own beats (a learner step, a weight sync, a checkpoint). When none of them
moved for `trainer.stall_timeout_s` it writes `RUN_DIR/stalls/<time>/`: `cause.txt`, the driver's threads, and
one `py-spy dump` per live actor of the cluster (on the actor's node), then interrupts the driver's main thread,
whose wait ends in `RunStalled` instead of hanging at 0% utilisation.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lightning_ray.faults import RunStalled, first_line

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 10.0
DUMP_TIMEOUT_S = 60.0


class Watchdog:
    """`probes`: name -> a function returning a counter (any comparable value); a change of any is progress."""

    def __init__(self, run_dir: Path, timeout_s: float, probes: dict[str, Callable[[], Any]]):
        self.run_dir, self.timeout_s, self.probes = run_dir, timeout_s, probes
        self.poll_s = min(10.0, max(0.5, timeout_s / 20))
        self.values: dict[str, Any] = {}
        self.beats = 0
        self.last_progress = time.monotonic()
        self.tripped: RunStalled | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # an interrupt is sent only while the watched block runs
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="lightning-ray-watchdog", daemon=True)

    def beat(self) -> None:
        """The driver progressed (a learner step, a sync, a checkpoint)."""
        self.beats += 1

    @contextmanager
    def watching(self) -> Iterator[Watchdog]:
        """Run the watchdog around a block; an interrupt it caused leaves the block as `RunStalled`."""
        self._thread.start()
        try:
            yield self
        except KeyboardInterrupt:
            if self.tripped is None:
                raise
            raise self.tripped from None
        finally:
            with self._lock:
                self._stop.set()
            self._thread.join(timeout=PROBE_TIMEOUT_S)

    def _read(self) -> dict[str, Any]:
        values = {"driver beats": self.beats}
        for name, probe in self.probes.items():
            try:
                values[name] = probe()
            except Exception as e:  # a probe that fails shows no progress; the stall may be why
                values[name] = f"no answer ({first_line(e)})"
        return values

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            values = self._read()
            now = time.monotonic()
            if values != self.values:
                self.values, self.last_progress = values, now
                continue
            if now - self.last_progress >= self.timeout_s:
                self._trip(values, now - self.last_progress)
                return

    def _trip(self, values: dict[str, Any], idle_s: float) -> None:
        out = self.run_dir / "stalls" / time.strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        counters = ", ".join(f"{k}={v}" for k, v in values.items())
        cause = (
            f"nothing progressed for {idle_s:.0f} s (trainer.stall_timeout_s={self.timeout_s:.0f}): "
            f"no LLM call recorded, no rollout finished, no learner step; counters stayed at {counters}"
        )
        (out / "cause.txt").write_text(cause + "\n")
        try:
            dump_stacks(out)
        except Exception as e:  # the cause matters more than the stacks: stop the run either way
            log.exception("writing the stacks of a stalled run failed")
            (out / "dump-error.txt").write_text(first_line(e) + "\n")
        self.tripped = RunStalled(f"{cause}; Python stacks of the driver and every actor in {out}")
        log.error("%s", self.tripped)
        with self._lock:
            if not self._stop.is_set() and self._main is not None:
                signal.pthread_kill(self._main, signal.SIGINT)


def dump_stacks(out: Path) -> list[Path]:
    """The Python stacks of the driver's threads and of every live actor of the cluster, one file each."""
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    driver = [
        f"--- thread {names.get(i, i)}\n{''.join(traceback.format_stack(f))}" for i, f in frames.items()
    ]
    written = [out / "driver.txt"]
    written[0].write_text("\n".join(driver))
    by_node: dict[str, list[dict[str, Any]]] = {}
    for actor in live_actors():
        by_node.setdefault(actor["node"], []).append(actor)
    calls = {
        node: _py_spy_dump.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
        ).remote([a["pid"] for a in group])
        for node, group in by_node.items()
    }
    for node, ref in calls.items():
        try:
            dumps = ray.get(ref, timeout=DUMP_TIMEOUT_S)
        except Exception as e:
            dumps = {a["pid"]: f"no dump from node {node}: {first_line(e)}" for a in by_node[node]}
        for actor in by_node[node]:
            name = f"{actor['class']}-{actor['name']}-{actor['pid']}.txt"
            path = out / "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
            path.write_text(dumps.get(actor["pid"], "no dump"))
            written.append(path)
    return written


def live_actors() -> list[dict[str, Any]]:
    """Every live actor of the cluster with its process id and node, from the GCS (the state API would need
    the dashboard, which a cluster may run without)."""
    from ray._private import state

    return [
        {
            "class": a["ActorClassName"],
            "name": a["Name"] or actor_id[:8],
            "pid": a["Pid"],
            "node": a["Address"]["NodeID"],
        }
        for actor_id, a in state.actors().items()
        if a["State"] == "ALIVE" and a.get("Pid")
    ]


@ray.remote(num_cpus=0)
def _py_spy_dump(pids: list[int]) -> dict[int, str]:
    """`py-spy dump` of each process (on the node this task runs on)."""
    exe = shutil.which("py-spy")
    if exe is None:
        return {pid: "py-spy is not installed on this node (pip install py-spy)" for pid in pids}
    dumps = {}
    for pid in pids:
        try:
            done = subprocess.run(
                [exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=DUMP_TIMEOUT_S / 2
            )
            dumps[pid] = done.stdout + (f"\n[py-spy stderr]\n{done.stderr}" if done.returncode else "")
        except subprocess.TimeoutExpired:
            dumps[pid] = "py-spy dump timed out"
    return dumps
