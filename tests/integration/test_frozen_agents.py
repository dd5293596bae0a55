"""`rollout.frozen_agents` on the tiny model: a frozen role is served by a second Serve app of the same model at
its starting weights, which a weight broadcast to the live app never reaches; other roles follow the live policy.
Both are recorded with exact ids, the frozen role's calls at policy version 0."""

from __future__ import annotations

import secrets

import numpy as np
import openai
import pytest
import ray
import torch
from ray import serve
from safetensors.torch import load_file

from lightning_ray.data.schema import Transition
from lightning_ray.gateway import Gateway, start_gateway_thread
from lightning_ray.gateway.render import decode, encode, render_chat
from lightning_ray.inference.server import FROZEN_APP_NAME, deploy_inference
from lightning_ray.weights.object_store import push_state

QUESTION = [
    {"role": "system", "content": "You check a solution."},
    {"role": "user", "content": "Is 12 * 7 = 84 right?"},
]
GREEDY = {"temperature": 0.0, "max_tokens": 12}
# (route role, model name, stream): how each call of one round names its role.
CALLS = [
    ("solver", None, False),
    ("checker", None, False),
    (None, "checker", False),  # the role from the model name, on the rollout's plain route
    ("checker", None, True),
]
ROLES = ["solver", "checker", "checker", "checker"]


@pytest.fixture
def frozen_app(inference, tiny_model_dir, tiny_config):
    """The frozen snapshot: the session's tiny model deployed a second time, under `FROZEN_APP_NAME`."""
    handle = deploy_inference(
        tiny_model_dir, tiny_config.model, tiny_config.inference, app_name=FROZEN_APP_NAME
    )
    yield handle
    serve.delete(FROZEN_APP_NAME)


@pytest.fixture
def gateway(frozen_app, inference, tiny_config):
    cfg = tiny_config.model_copy(deep=True)
    cfg.rollout.train_agents = ["solver"]
    cfg.rollout.frozen_agents = ["checker"]
    gw = start_gateway_thread(cfg, handle=inference)  # the frozen app is found by its name
    yield gw
    gw.stop_sync()


def ask(gw: Gateway, rollout_id: str, role: str | None, model: str | None, stream: bool) -> tuple[str, int]:
    """One greedy chat call; returns the text the client got and the policy version the gateway reported."""
    client = openai.OpenAI(base_url=gw.base_url(rollout_id, role), api_key=gw.api_key, max_retries=0)
    kw = {"model": model or gw.served_model, "messages": QUESTION, **GREEDY}
    if not stream:
        out = client.chat.completions.create(**kw)
        return out.choices[0].message.content, out.model_extra["policy_version"]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].model_extra["policy_version"]


def one_round(gw: Gateway, rollout_id: str) -> list[tuple[str, int]]:
    return [ask(gw, rollout_id, *call) for call in CALLS]


def perturbed_weights(tiny_model_dir) -> tuple[dict, dict]:
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.manual_seed(5)
    return original, {k: v + 0.5 * torch.randn_like(v) for k, v in original.items()}


@pytest.mark.slow  # CI time (a second vLLM deployment, ~65-150 s); role routing: test_frameworks_multi_agent.py
def test_frozen_role_keeps_the_starting_policy(gateway, inference, frozen_app, tiny_model_dir):
    tok = gateway.state.tokenizer
    rollout_id = secrets.token_urlsafe(16)
    gateway.open_rollout(rollout_id)
    live_version = inference.policy_version.remote().result()
    frozen_checksum = frozen_app.weights_checksum.remote().result()
    original, perturbed = perturbed_weights(tiny_model_dir)
    try:
        before = one_round(gateway, rollout_id)
        [result] = push_state(inference, ray.put(perturbed), live_version + 1)
        assert result["policy_version"] == live_version + 1
        after = one_round(gateway, rollout_id)
    finally:
        push_state(inference, ray.put({k: v.numpy() for k, v in original.items()}), live_version + 2)
        calls = gateway.close_rollout(rollout_id)

    # Before the broadcast both apps hold the same weights: every role gets the same greedy answer.
    assert len({text for text, _ in before}) == 1, before
    assert [v for _, v in before] == [live_version, 0, 0, 0]
    # After it, the live role's answer changes and the frozen role's does not, by route, model name or stream.
    assert after[0][0] != before[0][0] and after[0][1] == live_version + 1
    assert after[1:] == before[1:]
    assert frozen_app.policy_version.remote().result() == 0
    assert frozen_app.weights_checksum.remote().result() == frozen_checksum

    assert [t.agent for t in calls] == ROLES * 2
    assert [t.policy_version for t in calls] == [live_version, 0, 0, 0, live_version + 1, 0, 0, 0]
    assert_exact_ids(tok, calls, [text for text, _ in before + after])
    frozen_calls = [t for t in calls if t.agent == "checker"]
    assert all(t.response_ids == frozen_calls[0].response_ids for t in frozen_calls)
    for t in frozen_calls[1:]:
        assert np.allclose(t.response_logprobs, frozen_calls[0].response_logprobs, atol=1e-5)


def assert_exact_ids(tok, calls: list[Transition], texts: list[str]) -> None:
    """Every call is recorded with the prompt ids the gateway rendered and the ids behind the text sent back."""
    prompt_ids = encode(tok, render_chat(tok, QUESTION))
    for t, text in zip(calls, texts, strict=True):
        assert t.prompt_ids == prompt_ids
        assert t.response_text == decode(tok, t.response_ids) == text
        assert len(t.response_logprobs) == len(t.response_ids) > 0
