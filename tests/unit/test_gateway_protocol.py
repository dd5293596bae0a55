"""Request validation (errors name the field), role resolution and the per-rollout recorder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from lightning_ray.config import SamplingConfig
from lightning_ray.data.schema import Transition
from lightning_ray.gateway import calls
from lightning_ray.gateway.calls import DEFAULT_ROLE, Generation, resolve_role, sampling_for
from lightning_ray.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GatewayError,
    validation_error,
)
from lightning_ray.gateway.recorder import Recorder, UnknownRollout
from lightning_ray.inference.sampling import SAMPLING_KEYS

USER = [{"role": "user", "content": "hi"}]
NAMED = {"type": "function", "function": {"name": "calculator"}}


def error_of(model, body: dict) -> GatewayError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({}, "messages", "missing required field"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": "hi"}, "messages", "valid list"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role", "missing"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
            "text content",
        ),
        ({"messages": USER, "n": 2}, "n", "n=1"),
        ({"messages": USER, "temperature": "hot"}, "temperature", "number"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": USER, "stream": "yes please"}, "stream", "boolean"),
        ({"messages": USER, "tool_choice": "always"}, "tool_choice", '"required"'),
        ({"messages": USER, "tool_choice": {"type": "function"}}, "tool_choice", '"function": {"name"'),
        (
            {"messages": USER, "tool_choice": {"type": "function", "function": {"name": ""}}},
            "tool_choice",
            '"auto"',
        ),
        ({"messages": USER, "parallel_tool_calls": "maybe"}, "parallel_tool_calls", "boolean"),
    ],
)
def test_chat_errors_name_the_field(body, param, words):
    err = error_of(ChatCompletionRequest, body)
    assert err.status == 400
    assert err.param == param
    assert words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("choice", "forced"),
    [(None, None), ("none", None), ("auto", None), ("required", None), (NAMED, "calculator")],
)
def test_valid_tool_choices(choice, forced):
    req = ChatCompletionRequest.model_validate({"messages": USER, "tool_choice": choice})
    assert req.tool_choice == choice
    assert req.forced_function() == forced


def test_unknown_openai_parameters_pass():
    req = ChatCompletionRequest.model_validate(
        {"messages": USER, "presence_penalty": 0.5, "user": "x", "response_format": {"type": "text"}}
    )
    assert req.messages[0].to_template() == {"role": "user", "content": "hi"}


def test_message_content_parts_and_extra_fields_reach_the_template():
    msg = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "name": "ann",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        }
    ).messages[0]
    assert msg.to_template() == {"role": "user", "name": "ann", "content": "a\nb"}
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "assistant"}]}).messages[
        0
    ].to_template() == {
        "role": "assistant",
        "content": "",
    }


def test_sampling_helpers():
    req = ChatCompletionRequest.model_validate({"messages": USER, "stop": "\n", "max_completion_tokens": 7})
    assert req.stop_list() == ["\n"]
    assert req.requested_max_tokens() == 7
    assert not req.include_usage()
    req = ChatCompletionRequest.model_validate({"messages": USER, "stream_options": {"include_usage": True}})
    assert req.include_usage() and req.stop_list() is None


def test_sampling_keys_come_from_the_config(monkeypatch):
    """The request's settings go over the configured ones, key by key of `SamplingConfig`, and the engine
    takes every one of them; a setting that `SamplingRequest` does not declare arrives as an extra."""
    state = SimpleNamespace(max_model_len=64, sampling_defaults=SamplingConfig().model_dump())
    body = {"messages": USER, "temperature": 0.5, "top_k": 3, "seed": 1, "max_tokens": 500, "min_p": 0.2}
    got = sampling_for(state, ChatCompletionRequest.model_validate(body), prompt_len=14)
    assert got == {"temperature": 0.5, "top_p": 1.0, "top_k": 3, "seed": 1, "stop": None, "max_tokens": 50}
    assert set(SamplingConfig.model_fields) | {"seed", "stop"} <= set(SAMPLING_KEYS)
    monkeypatch.setattr(calls, "REQUEST_SAMPLING_KEYS", (*calls.REQUEST_SAMPLING_KEYS, "min_p"))
    assert sampling_for(state, ChatCompletionRequest.model_validate(body), prompt_len=14)["min_p"] == 0.2


@pytest.mark.parametrize(
    ("prompt", "expected"), [("abc", "abc"), ([5, 6], [5, 6]), (["abc"], "abc"), ([[5]], [5])]
)
def test_completion_prompt_forms(prompt, expected):
    assert CompletionRequest.model_validate({"prompt": prompt}).single_prompt() == expected


@pytest.mark.parametrize(("prompt", "words"), [(["a", "b"], "batch"), ("", "empty"), ([], "empty")])
def test_completion_prompt_errors(prompt, words):
    with pytest.raises(GatewayError, match=words) as info:
        CompletionRequest.model_validate({"prompt": prompt}).single_prompt()
    assert info.value.param == "prompt"


@pytest.mark.parametrize(("field", "value"), [("echo", True), ("best_of", 3), ("suffix", "x"), ("n", 4)])
def test_completion_options_that_would_break_the_trace(field, value):
    assert error_of(CompletionRequest, {"prompt": "x", field: value}).param == field


def test_role_from_route_then_model_then_default():
    assert resolve_role("solver", "checker", "smol") == "solver"
    assert resolve_role(None, "checker", "smol") == "checker"
    assert resolve_role(None, "smol", "smol") == DEFAULT_ROLE
    assert resolve_role(None, None, "smol") == DEFAULT_ROLE
    with pytest.raises(GatewayError):
        resolve_role("bad role!", None, "smol")


def test_a_streamed_generation_keeps_each_tokens_version_and_the_version_it_started_on():
    gen = Generation()
    for ids, version, finish in [([1, 2], 4, None), ([3], 5, None), ([], 5, "stop")]:  # updated after token 2
        gen.add(
            {
                "response_ids": ids,
                "response_logprobs": [-0.5] * len(ids),
                "policy_version": version,
                "finish_reason": finish,
            }
        )
    assert (gen.response_ids, gen.response_versions) == ([1, 2, 3], [4, 4, 5])
    assert (gen.policy_version, gen.finish_reason) == (4, "stop")


def transition(index: int) -> Transition:
    return Transition(index, "default", [1], [2], [-0.1], [0], 0, "stop", 0.1, "x")


def test_recorder_orders_calls_and_forgets_closed_rollouts():
    rec = Recorder()
    rec.open("r1", priority=3)
    with pytest.raises(ValueError, match="already open"):
        rec.open("r1")
    (first, priority), (second, _) = rec.reserve("r1"), rec.reserve("r1")
    assert priority == 3  # the rollout's, on each of its calls
    assert rec.record("r1", transition(second), None)
    assert rec.record("r1", transition(first), None)
    assert [t.call_index for t in rec.transitions("r1")] == [0, 1]
    assert [t.call_index for t in rec.close("r1")] == [0, 1]
    assert not rec.is_open("r1")
    assert not rec.record("r1", transition(2), None)  # a call that outlived its rollout is dropped
    for call in (rec.close, rec.transitions, rec.history, rec.reserve):
        with pytest.raises(UnknownRollout):
            call("r1")


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 129, "../etc"])
def test_recorder_rejects_ids_that_are_not_url_safe(bad):
    with pytest.raises(ValueError, match="invalid rollout id"):
        Recorder().open(bad)
