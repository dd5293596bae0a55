"""Every malformed request gets a 4xx OpenAI-style JSON error from the real gateway app, never a 500.

The app, its validation, the SmolLM2 tokenizer and chat template are real. The inference engine is replaced by
one that answers 503: none of these requests may get that far, and the control row shows that a valid request
does reach it (so a 4xx here is the gateway's own refusal)."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from lightning_ray.gateway.app import create_app
from lightning_ray.gateway.calls import GatewayState
from lightning_ray.gateway.guards import MAX_JSON_DEPTH
from lightning_ray.gateway.protocol import GatewayError
from lightning_ray.gateway.recorder import Recorder
from lightning_ray.gateway.render import load_tokenizer
from lightning_ray.models import builtin_tokenizer_dir

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CHAT, COMPLETIONS = "/rollout/r1/v1/chat/completions", "/rollout/r1/v1/completions"


class UnreachableEngine:
    """Answers every engine call with 503 `reached the engine`."""

    def __getattr__(self, name: str):
        def refuse(*args, **kwargs):
            raise GatewayError(503, "reached the engine")

        return refuse


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def chat(**fields) -> str:
    return json.dumps({"messages": USER, **fields})


MALFORMED = [
    # (id, route, raw body, words in the error message)
    ("not json", CHAT, "{", "not valid JSON"),
    ("empty body", CHAT, "", "not valid JSON"),
    ("invalid utf-8", CHAT, b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid JSON"),
    ("array body", CHAT, "[1]", "JSON object"),
    ("null body", CHAT, "null", "JSON object"),
    ("string body", CHAT, '"hi"', "JSON object"),
    ("deep json (recursion)", CHAT, '{"messages": ' + nested(100_000) + "}", "nests more than"),
    ("deep json (parses)", CHAT, '{"messages": ' + nested(MAX_JSON_DEPTH + 1) + "}", "nests more than"),
    ("deep tool schema", CHAT, chat(tools=[{"x": json.loads(nested(200))}]), "nests more than"),
    ("lone surrogate", CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid unicode"),
    ("lone surrogate key", CHAT, '{"messages": [{"role": "user", "\\udc00": 1}]}', "invalid unicode"),
    ("lone surrogate prompt", COMPLETIONS, '{"prompt": "a\\udfffb"}', "invalid unicode in 'prompt'"),
    ("integer of 5000 digits", CHAT, '{"messages": [], "max_tokens": ' + "9" * 5000 + "}", "not valid JSON"),
    ("NaN temperature", CHAT, chat(temperature=float("nan")), "temperature"),
    ("NaN top_p", CHAT, chat(top_p=float("nan")), "top_p"),
    ("NaN seed", CHAT, chat(seed=float("nan")), "seed"),
    ("infinite max_tokens", CHAT, chat(max_tokens=float("inf")), "max_tokens"),
    (
        "1e999 temperature",
        CHAT,
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
        "temperature",
    ),
    ("huge top_logprobs", CHAT, chat(top_logprobs=10**30), "top_logprobs"),
    ("huge seed", CHAT, chat(seed=10**30), "seed"),
    ("messages a string", CHAT, json.dumps({"messages": "hi"}), "messages"),
    ("message an int", CHAT, json.dumps({"messages": [1]}), "messages.0"),
    ("role an int", CHAT, json.dumps({"messages": [{"role": 1}]}), "messages.0.role"),
    (
        "content an int",
        CHAT,
        json.dumps({"messages": [{"role": "user", "content": 3}]}),
        "messages.0.content",
    ),
    (
        "tool_calls a string",
        CHAT,
        json.dumps({"messages": [{"role": "assistant", "tool_calls": "x"}]}),
        "tool_calls",
    ),
    ("tools not objects", CHAT, chat(tools=["x"]), "tools.0"),
    ("stop not strings", CHAT, chat(stop=[1]), "stop"),
    ("stream a string", CHAT, chat(stream="maybe"), "stream"),
    ("stream_options a string", CHAT, chat(stream_options="x"), "stream_options"),
    ("chat_template_kwargs a list", CHAT, chat(chat_template_kwargs=[1]), "chat_template_kwargs"),
    ("template kwargs clash", CHAT, chat(chat_template_kwargs={"tokenize": True}), "chat template failed"),
    ("model an int", CHAT, chat(model=5), "model"),
    ("prompt an object", COMPLETIONS, json.dumps({"prompt": {"a": 1}}), "prompt"),
    ("prompt ids out of range", COMPLETIONS, json.dumps({"prompt": [10**30]}), "outside the vocabulary"),
    ("prompt ids mixed", COMPLETIONS, json.dumps({"prompt": [1, "a"]}), "prompt"),
    ("NaN logprobs", COMPLETIONS, '{"prompt": "hi", "logprobs": NaN}', "logprobs"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(builtin_tokenizer_dir())


def client(tokenizer, tool_parser: str = "hermes") -> TestClient:
    state = GatewayState(
        tokenizer=tokenizer,
        engine=UnreachableEngine(),
        recorder=Recorder(),
        served_model="tiny",
        max_model_len=4096,
        tool_parser=tool_parser,
    )
    state.recorder.open("r1")
    return TestClient(create_app(state, public_url="http://127.0.0.1"), raise_server_exceptions=False)


def post(c: TestClient, route: str, body: str | bytes):
    data = body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")
    return c.post(route, content=data, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("route", "body", "words"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_are_4xx_json(tokenizer, route, body, words):
    r = post(client(tokenizer), route, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_unknown_tool_parser_is_400_naming_it(tokenizer):
    r = post(client(tokenizer, tool_parser="no-such-parser"), CHAT, chat(tools=[TOOL]))
    assert r.status_code == 400, r.text
    assert "unknown tool parser 'no-such-parser'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "tools"


def test_valid_requests_reach_the_engine(tokenizer):
    """The control: well-formed requests (tools, odd but legal fields) pass the gateway's checks."""
    c = client(tokenizer)
    for route, body in [
        (CHAT, chat(max_tokens=10**40)),  # clamped to the context, not an error
        (CHAT, chat(tools=[TOOL], temperature=0.0)),
        (CHAT, '{"messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}]}'),  # a valid pair
        (COMPLETIONS, json.dumps({"prompt": [1, 2, 3]})),
    ]:
        r = post(c, route, body)
        assert r.status_code == 503 and "reached the engine" in r.text, (body[:80], r.text[:300])
