"""Makes tests/data/view_run/, the small finished run that the run-page tests load.

A real 3-step `lightning-ray train` (the CLI, so it also prints the run page's URL) of `demo_agent` below on the
tiny random model: multi-turn calls with a tool result between them, per-call rewards, captured logs, and
`tool_error` / `no_reward` failures; its checkpoints are left out.

    flock /tmp/lr-heavy.lock python -m tests.make_view_run
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import openai

import lightning_ray as lr

OUT = Path(__file__).parent / "data" / "view_run"
MODES = ["ok", "emit", "ok", "tool_error", "ok", "none"]
log = logging.getLogger("demo_agent")


@lr.rollout
async def demo_agent(task: dict, llm: lr.LLM) -> float | None:
    """Asks, gets a calculator result back as a tool response, asks again; `mode` picks the ending."""
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0)
    messages = [{"role": "user", "content": task["question"]}]
    reply = await client.chat.completions.create(model=llm.model, messages=messages, **llm.sampling_kwargs())
    first = reply.choices[0].message.content or ""
    log.warning("received %s", json.dumps(first))  # the page must show exactly this
    if task["mode"] == "tool_error":
        raise lr.ToolError(f"calculator cannot parse {first[:12]!r}")
    if task["mode"] == "emit":
        lr.emit_reward(0.1, format=1.0)
    messages += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": f"<tool_response>\n{len(first)}\n</tool_response>"},
    ]
    reply = await client.chat.completions.create(model=llm.model, messages=messages, **llm.sampling_kwargs())
    second = reply.choices[0].message.content or ""
    print(f"received {json.dumps(second)}")
    return None if task["mode"] == "none" else float(len(second) % 3 == 0)


def main() -> None:
    from lightning_ray.models import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="view-run-"))
    model = make_tiny_model(work / "model")
    tasks = work / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "question": f"What is {i} * {i + 3}?", "mode": MODES[i % len(MODES)]})
            + "\n"
            for i in range(12)
        )
    )
    overrides = [
        f"model.path={model}",
        "model.dtype=float32",
        "inference.max_model_len=1024",
        "inference.num_cpus_per_replica=0.5",
        "inference.sampling.max_tokens=24",
        "rollout.agent=tests.make_view_run:demo_agent",
        "rollout.num_workers=1",
        "rollout.concurrency=8",
        "rollout.max_failure_rate=0.95",
        f"data.train={tasks}",
        f"data.val={tasks}",
        "algorithm.group_size=4",
        "learner.num_cpus_per_worker=0.5",
        "learner.lr=1e-4",
        f"trainer.run_dir={work / 'runs'}",
        "trainer.steps=3",
        "trainer.tasks_per_step=3",
        "trainer.val_every=2",
        "trainer.val_limit=4",
        "trainer.checkpoint_every=0",
        "logging.wandb=false",
        "ray.num_cpus=8",
    ]
    config = work / "view.yaml"
    config.write_text("trainer: {name: view}\n")
    subprocess.run([sys.executable, "-m", "lightning_ray.cli", "train", str(config), *overrides], check=True)
    [run_dir] = (work / "runs" / "view").iterdir()
    shutil.rmtree(OUT, ignore_errors=True)
    shutil.copytree(run_dir, OUT, ignore=shutil.ignore_patterns("checkpoints", "report.html", "stalls"))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
