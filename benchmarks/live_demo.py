"""Learning from live traffic, end to end on this box: a scripted user asks calc questions of a model served by
`lightning-ray serve --learn` and rewards the answers a few seconds later; the served policy's held-out success
is measured as it trains.

    flock /tmp/lr-heavy.lock python -m benchmarks.live_demo --minutes 30
    flock /tmp/lr-heavy.lock python -m benchmarks.live_demo --minutes 1 model.path=TINY_MODEL_DIR   # the smoke

Writes `benchmarks/results/live_demo.json` and `.png` (`--out`); arguments after the options are config
overrides, passed to the server as they are.

How it runs:
- Ray: this script starts the local Ray cluster (`init_ray` of the config) and the server joins it
  (`ray.address`), so that this process reaches the server's inference app (named by the `ray.run_id` given to
  it). `lightning-ray serve CONFIG --learn` runs as a subprocess; its output goes to `RUN_DIR/../demo-*.log`,
  its printed gateway URL and run directory are read from it. At the end it is stopped by its pid (SIGINT, as
  Ctrl-C; SIGKILL after 180 s), then the cluster with `ray.shutdown()`.
- The user (`--users` threads, up to 4 requests in flight): single-turn. Each request opens a rollout
  (`POST /rollouts`) and asks the calc agent's prompt (`examples.calc.prompt.initial_messages`: SYSTEM_RULE, its
  two worked examples, then a question drawn at random from examples/calc/data/train.jsonl) once, with the
  served sampling settings. The reply is scored by `examples.calc.live_scorer.score` (the config's
  `live.scorer` too: the extra samples and the user get the same reward) and the reward is posted
  (`POST /rollouts/{id}/reward`) after a random 2-8 s, while the thread, after a pause of 4-12 s, asks its next
  question. The pause keeps the two replicas from taking the learner's CPU: on this 2-core box a user asking
  without pause kept inference 90% busy and a learner step took 90-140 s instead of seconds. The worked
  examples stay in the prompt: without them SmolLM2-135M almost never uses the tags (examples/calc/prompt.py).
- Held-out success: the live gateway has no unrecorded OpenAI route (every call there belongs to a live rollout,
  and with `live.group_fraction: 1` every rollout becomes a trained group), so this script runs a plain gateway
  of its own (`start_gateway_thread`, no live routes) on the same inference app: its rollouts live only in its
  own recorder and are closed after each question, never reaching the live desk, its pool or the reward hooks.
  At the start, every `--eval-every` minutes and at the end it asks the first `--eval-n` questions of
  examples/calc/data/val.jsonl (never asked by the user) greedily (temperature 0); solved = score 1.0. Each
  answer's `policy_version` comes from the rollout's recorded call, so success is kept by time and by version.
- From the run directory: the step rows (metrics.jsonl), the canary's decisions (canary.jsonl, copied in
  whole), how the live rollouts ended (live.jsonl) and summary.json. The load average is read at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.live_demo_plot import plot
from examples.calc.live_scorer import DATA, score
from examples.calc.prompt import initial_messages
from lightning_ray.config import load_config
from lightning_ray.monitor.run_log import read_json_lines

RESULTS = Path(__file__).parent / "results"
START_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 180.0
REWARD_DELAY_S = (2.0, 8.0)
THINK_S = (4.0, 12.0)  # a user thread's pause between its questions


def post(url: str, body: dict | None = None, method: str = "POST", timeout: float = 300.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{method} {url}: {err.code} {err.read()[:300]!r}") from None


def ask(gateway: str, question: str, **sampling: Any) -> tuple[str, str]:
    """Open a rollout at `gateway` and ask `question` once; returns (rollout_id, reply)."""
    opened = post(f"{gateway}/rollouts")
    body = {"model": "policy", "messages": initial_messages(question), **sampling}
    reply = post(f"{opened['base_url']}/chat/completions", body)
    return opened["rollout_id"], reply["choices"][0]["message"]["content"] or ""


def read_tasks(split: str) -> list[dict]:
    with (DATA / f"{split}.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


class Server:
    """`lightning-ray serve CONFIG --learn` in a subprocess: its output to a log, its gateway URL and run
    directory read from it."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.found: dict[str, str] = {}
        self.ready = threading.Event()
        # The console script does not put the working directory on sys.path, where live.scorer's module is.
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONPATH": path},
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                for key, prefix in (("url", "gateway: "), ("run_dir", "run directory: ")):
                    if line.startswith(prefix):
                        self.found[key] = line[len(prefix) :].split()[0]
                if line.startswith("step ") and "%|" not in line:
                    print(f"[server] {line.rstrip()}", flush=True)
                if "run_dir" in self.found and "url" in self.found:
                    self.ready.set()
        self.ready.set()

    def wait_ready(self) -> tuple[str, Path]:
        if not self.ready.wait(START_TIMEOUT_S) or "run_dir" not in self.found:
            raise RuntimeError(f"the server did not start (rc {self.proc.poll()}); see {self.log_path}")
        return self.found["url"], Path(self.found["run_dir"])

    def stop(self) -> int | None:
        """SIGINT (Ctrl-C: the loop writes its summary and stops what it started), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        return self.proc.returncode


class User:
    """`n` threads asking train questions; each reply is rewarded after a random delay (see the docstring)."""

    def __init__(self, url: str, n: int, seed: int, t0: float) -> None:
        self.url, self.t0 = url, t0
        self.tasks = read_tasks("train")
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.records: list[dict[str, Any]] = []
        self.errors: Counter[str] = Counter()
        self.timers: list[threading.Timer] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                task, delay = self.random.choice(self.tasks), self.random.uniform(*REWARD_DELAY_S)
                think = self.random.uniform(*THINK_S)
            try:
                rollout_id, reply = ask(self.url, task["question"])
            except Exception as e:  # the server is stopping, or failed: counted, and the user goes on
                self.errors[type(e).__name__] += 1
                time.sleep(1.0)
                continue
            record = {"asked_s": time.monotonic() - self.t0, "reward": score(task["question"], reply)}
            timer = threading.Timer(delay, self._reward, (rollout_id, record))
            with self.lock:
                self.timers.append(timer)
            timer.start()
            self.stop.wait(think)

    def _reward(self, rollout_id: str, record: dict[str, Any]) -> None:
        try:
            answer = post(f"{self.url}/rollouts/{rollout_id}/reward", {"value": record["reward"]})
            record.update(policy_version=answer["policy_version"], grouped=answer["grouped"])
        except Exception as e:
            record["error"] = str(e)[:200]
        record["rewarded_s"] = time.monotonic() - self.t0
        with self.lock:
            self.records.append(record)

    def finish(self) -> None:
        """Stop asking; the rewards already due are still posted."""
        self.stop.set()
        for thread in self.threads:
            thread.join()
        for timer in list(self.timers):
            timer.join()


def held_out(gateway: str, tasks: list[dict], max_tokens: int, t0: float) -> dict[str, Any]:
    """The served policy's greedy success on `tasks` (through the demo's own, unrecorded gateway)."""
    started = time.monotonic()

    def one(task: dict) -> tuple[int | None, bool]:
        rollout_id, reply = ask(gateway, task["question"], temperature=0.0, max_tokens=max_tokens)
        calls = post(f"{gateway}/rollouts/{rollout_id}", method="DELETE")["transitions"]
        return calls[0]["policy_version"], score(task["question"], reply) == 1.0

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, tasks))
    by_version: dict[str, list[int]] = {}
    for version, solved in answers:
        counts = by_version.setdefault(str(version), [0, 0])
        counts[0], counts[1] = counts[0] + solved, counts[1] + 1
    point = {
        "time_s": round(started - t0, 1),
        "success": sum(solved for _, solved in answers) / len(answers),
        "n": len(answers),
        "by_version": by_version,  # version -> [solved, asked]
        "eval_s": round(time.monotonic() - started, 1),
    }
    print(f"held-out at {point['time_s'] / 60:.1f} min: {point['success']:.0%} {by_version}", flush=True)
    return point


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_json_lines(path) if path.exists() else []


STEP_KEYS = (
    "step",
    "time/step_s",
    "rollout/reward_mean",
    "rollout/rollouts",
    "rollout/policy_version",
    "advantage/groups",
    "advantage/groups_zero_variance",
    "staleness/dropped_share",
    "learner/loss",
    "time/learner_s",
    "sync/version",
    "canary/promoted",
    "canary/rolled_back",
)


def run_outcome(run_dir: Path) -> dict[str, Any]:
    """What the run directory says: the steps, the canary's rows, how live rollouts ended, the summary."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    summary = run_dir / "summary.json"
    live = read_jsonl(run_dir / "live.jsonl")
    return {
        "run_dir": str(run_dir),
        "steps_done": max((r["step"] for r in rows), default=0),
        "steps": [{k: r[k] for k in STEP_KEYS if k in r} for r in rows],
        "canary": read_jsonl(run_dir / "canary.jsonl"),
        "live_rollouts_ended": dict(Counter(line["ended"] for line in live)),
        "summary": json.loads(summary.read_text()) if summary.exists() else None,
    }


def user_curve(records: list[dict[str, Any]], bin_s: float = 120.0) -> list[dict[str, Any]]:
    """The user's mean reward and share of right answers per `bin_s` of asking time."""
    bins: dict[int, list[float]] = {}
    for r in records:
        bins.setdefault(int(r["asked_s"] // bin_s), []).append(r["reward"])
    return [
        {
            "time_s": (b + 0.5) * bin_s,
            "n": len(v),
            "reward_mean": sum(v) / len(v),
            "right": sum(x == 1.0 for x in v) / len(v),
        }
        for b, v in sorted(bins.items())
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the user asks (default 30)")
    parser.add_argument("--config", default="configs/live_demo.yaml")
    parser.add_argument("--eval-every", type=float, default=6.0, help="minutes between held-out checks")
    parser.add_argument("--eval-n", type=int, default=50, help="the first N val questions")
    parser.add_argument("--users", type=int, default=4, help="user requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "live_demo", help="writes OUT.json and OUT.png")
    parser.add_argument("overrides", nargs="*", help="config overrides (key.sub=value), passed to the server")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import ray

    from lightning_ray.gateway.server import start_gateway_thread
    from lightning_ray.runtime import init_ray

    args = parse_args(argv)
    run_id = f"live-demo-{secrets.token_hex(3)}"
    cfg = load_config(args.config, [*args.overrides, f"ray.run_id={run_id}"])
    load_start = os.getloadavg()
    init_ray(cfg)
    gcs = ray.get_runtime_context().gcs_address
    log_dir = Path(cfg.trainer.run_dir) / cfg.trainer.name
    log_dir.mkdir(parents=True, exist_ok=True)
    command = ["lightning-ray", "serve", args.config, "--learn", *args.overrides]
    command += [f"ray.run_id={run_id}", f"ray.address={gcs}"]
    print("$ " + " ".join(command), flush=True)
    server = Server(command, log_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log")
    evaluator = user = None
    try:
        url, run_dir = server.wait_ready()
        evaluator = start_gateway_thread(cfg, manage_rollouts=True)
        val = read_tasks("val")[: args.eval_n]
        max_tokens = cfg.inference.sampling.max_tokens
        t0, started_unix = time.monotonic(), time.time()
        points = [held_out(evaluator.url, val, max_tokens, t0)]
        user = User(url, args.users, args.seed, time.monotonic())
        user.start()
        end = t0 + args.minutes * 60
        while (now := time.monotonic()) < end and server.proc.poll() is None:
            time.sleep(min(args.eval_every * 60, end - now))
            if time.monotonic() < end - 30 and server.proc.poll() is None:
                points.append(held_out(evaluator.url, val, max_tokens, t0))
        user.finish()
        if server.proc.poll() is None:
            points.append(held_out(evaluator.url, val, max_tokens, t0))
    finally:
        if user is not None:
            user.stop.set()
        if evaluator is not None:
            evaluator.stop_sync()
        rc = server.stop()
        ray.shutdown()
    records = sorted(user.records, key=lambda r: r["asked_s"])
    result = {
        "what": "serve --learn on live traffic from a scripted calc user (benchmarks/live_demo.py docstring)",
        "command": " ".join(command),
        "config": args.config,
        "overrides": args.overrides,
        "model": cfg.model.path,
        "canary": cfg.inference.canary.model_dump() if cfg.inference.canary else None,
        "minutes": args.minutes,
        "started_unix": started_unix,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "server_rc": rc,
        "server_log": str(server.log_path),
        "held_out": points,
        "held_out_by_version": merged_by_version(points),
        "user": {
            "requests": len(records),
            "rewarded": sum("policy_version" in r for r in records),
            "reward_errors": Counter(r["error"][:60] for r in records if "error" in r),
            "ask_errors": dict(user.errors),
            "curve": user_curve(records),
        },
        "run": run_outcome(run_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("held_out", "load_avg_start", "load_avg_end")}, indent=1))
    return result


def merged_by_version(points: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Held-out [solved, asked] by policy version over every check."""
    out: dict[str, list[int]] = {}
    for point in points:
        for version, (solved, asked) in point["by_version"].items():
            counts = out.setdefault(version, [0, 0])
            counts[0], counts[1] = counts[0] + solved, counts[1] + asked
    return out


if __name__ == "__main__":
    main()
