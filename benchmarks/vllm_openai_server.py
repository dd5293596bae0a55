"""vLLM's own OpenAI-compatible server as a peer: what an agent pays when it is pointed at vLLM directly.

`start_vllm_openai` runs `python -m vllm.entrypoints.openai.api_server` as a child process with the engine
settings of the Serve deployment it is compared with (`engine_args.engine_settings`, as flags: dtype, context,
batch size, seed, prefix caching and its KV block size, on CPU whole prompts per engine step), the same model
folder, and on CPU the environment a replica's engine gets (`cpu_env.engine_env`: KV cache, OpenMP threads,
executor; `LD_PRELOAD` of tcmalloc and Intel OpenMP). It binds 127.0.0.1 only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lightning_ray.config import Config
from lightning_ray.inference.cpu_env import cpu_preload_env, engine_env
from lightning_ray.inference.engine_args import as_cli_flags, engine_settings


def start_vllm_openai(model_dir: Path, cfg: Config, served_name: str, log: Path, timeout_s: float = 600):
    """Start the server; returns (process, its OpenAI base URL) once `/health` answers. Its output goes to
    `log`; a server that exits while starting raises with the log's last lines."""
    inference = cfg.inference
    env = {**os.environ, **engine_env(inference)}
    if inference.num_gpus_per_replica == 0:
        env.update(cpu_preload_env(inference.cpu_preload)[0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [
        *(sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)),
        *("--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)),
        *as_cli_flags(engine_settings(cfg.model, inference)),
        *("--disable-uvicorn-access-log", "--disable-log-stats"),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while not _healthy(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_vllm_openai(proc)
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
            raise RuntimeError(f"vLLM's OpenAI server did not start (its log, {log}):\n{tail}")
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}/v1"


def stop_vllm_openai(proc: subprocess.Popen) -> None:
    """SIGTERM (the server shuts its engine down), then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
