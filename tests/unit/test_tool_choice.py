"""`tool_choice` on the real SmolLM2 tokenizer, vLLM's real hermes parser and xgrammar (the engine's grammar
backend): request checks, the JSON schema that constrains generation, and reading constrained answers back as
tool calls."""

from __future__ import annotations

import copy
import json

import pytest
import xgrammar

from lightning_ray.gateway.protocol import ChatCompletionRequest, GatewayError
from lightning_ray.gateway.tools import (
    ToolCallParser,
    ToolChoice,
    constraint_schema,
    load_parser_class,
    tool_call_parser,
    tool_choice,
)
from lightning_ray.inference.sampling import sampling_params
from lightning_ray.models import builtin_tokenizer_dir
from tests.tools import CALC_TOOL

CLOCK_TOOL = {"type": "function", "function": {"name": "clock", "description": "The time now."}}
PICK_TOOL = {
    "type": "function",
    "function": {
        "name": "pick_operation",
        "parameters": {
            "type": "object",
            "properties": {"op": {"type": "string", "enum": ["add", "mul"]}},
            "required": ["op"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [CALC_TOOL, CLOCK_TOOL]
QUESTION = [{"role": "user", "content": "What is 12 * 7?"}]
NAMED_CALC = {"type": "function", "function": {"name": "calculator"}}


@pytest.fixture(scope="module")
def tok():
    from lightning_ray.gateway.render import load_tokenizer

    return load_tokenizer(builtin_tokenizer_dir())


def request(tools: list[dict] | None = TOOLS, **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": QUESTION, "tools": tools, **kw})


def parser(tok, **kw) -> ToolCallParser:
    return ToolCallParser(load_parser_class("hermes"), tok, request(**kw))


def accepts(schema: dict, text: str) -> bool:
    """Whether xgrammar, compiling `schema` the way vLLM's backend does, accepts `text` as a whole answer."""
    grammar = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([])).compile_json_schema(json.dumps(schema))
    matcher = xgrammar.GrammarMatcher(grammar)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, ToolChoice("auto")),
        ({"tools": None}, ToolChoice("none")),
        ({"tools": None, "tool_choice": "auto"}, ToolChoice("auto")),
        ({"tool_choice": "none"}, ToolChoice("none")),
        ({"tool_choice": "required"}, ToolChoice("required")),
        ({"tool_choice": NAMED_CALC}, ToolChoice("function", "calculator")),
    ],
)
def test_tool_choice_modes(kw, expected):
    choice = tool_choice(request(**kw))
    assert choice == expected
    assert choice.constrained == (expected.mode in ("required", "function"))


def test_unknown_function_name_is_a_400_naming_the_field():
    named = {"type": "function", "function": {"name": "weather"}}
    with pytest.raises(GatewayError) as info:
        tool_choice(request(tool_choice=named))
    err = info.value
    assert err.status == 400 and err.param == "tool_choice.function.name"
    assert "'weather'" in err.message and "'calculator', 'clock'" in err.message


@pytest.mark.parametrize("choice", ["required", NAMED_CALC])
def test_forcing_a_call_without_tools_is_a_400(tok, choice):
    with pytest.raises(GatewayError) as info:
        tool_call_parser("hermes", tok, request(tools=None, tool_choice=choice))
    assert info.value.status == 400 and info.value.param == "tool_choice"
    assert tool_call_parser("hermes", tok, request(tools=None, tool_choice="auto")) is None


def test_named_schema_is_the_functions_arguments():
    schema = constraint_schema(TOOLS, ToolChoice("function", "calculator"))
    assert schema == CALC_TOOL["function"]["parameters"]
    assert accepts(schema, '{"expression": "12*7"}')
    assert not accepts(schema, '{"expr": "12*7"}')
    no_params = constraint_schema(TOOLS, ToolChoice("function", "clock"))
    assert no_params == {"type": "object", "properties": {}}
    assert accepts(no_params, "{}")


def test_required_schema_is_a_non_empty_list_of_named_calls():
    schema = constraint_schema(TOOLS, ToolChoice("required"))
    one = '[{"name": "calculator", "parameters": {"expression": "12*7"}}]'
    two = '[{"name": "calculator", "parameters": {"expression": "1"}}, {"name": "clock", "parameters": {}}]'
    assert accepts(schema, one) and accepts(schema, two)
    assert not accepts(schema, "[]")
    assert not accepts(schema, '[{"name": "weather", "parameters": {}}]')
    assert not accepts(schema, '[{"name": "calculator", "parameters": {}}]')
    assert not accepts(schema, '{"name": "clock", "parameters": {}}')
    single = constraint_schema(TOOLS, ToolChoice("required"), parallel_tool_calls=False)
    assert accepts(single, one) and not accepts(single, two)


@pytest.mark.parametrize("choice", [ToolChoice("auto"), ToolChoice("none")])
def test_free_choices_have_no_schema(choice):
    assert constraint_schema(TOOLS, choice) is None


def test_required_schema_lifts_defs_to_its_root_without_touching_the_tools():
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    move = {
        "type": "function",
        "function": {
            "name": "move",
            "parameters": {
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/Point"}},
                "required": ["to"],
                "$defs": {"Point": point},
            },
        },
    }
    tools = [move, CALC_TOOL]
    before = copy.deepcopy(tools)
    schema = constraint_schema(tools, ToolChoice("required"))
    assert tools == before
    assert schema["$defs"] == {"Point": point}
    assert accepts(schema, '[{"name": "move", "parameters": {"to": {"x": 3}}}]')
    assert not accepts(schema, '[{"name": "move", "parameters": {"to": {"y": 3}}}]')
    clash = copy.deepcopy(move)
    clash["function"]["name"] = "jump"
    clash["function"]["parameters"]["$defs"]["Point"] = {"type": "string"}
    with pytest.raises(GatewayError) as info:
        constraint_schema([move, clash], ToolChoice("required"))
    assert info.value.param == "tools" and "Point" in info.value.message


def test_required_answer_reads_as_tool_calls(tok):
    p = parser(tok, tool_choice="required")
    assert p.sampling() == {"json_schema": p.schema} and p.schema["type"] == "array"
    text = (
        '[{"name": "calculator", "parameters": {"expression": "12*7"}}, {"name": "clock", "parameters": {}}]'
    )
    reply = p.parse(text)
    assert reply.content is None and reply.finish_reason_override == "tool_calls"
    assert [c["function"]["name"] for c in reply.tool_calls] == ["calculator", "clock"]
    assert json.loads(reply.tool_calls[0]["function"]["arguments"]) == {"expression": "12*7"}
    assert json.loads(reply.tool_calls[1]["function"]["arguments"]) == {}
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in reply.tool_calls)
    assert len({c["id"] for c in reply.tool_calls}) == 2


def test_named_answer_is_the_arguments_and_keeps_finish_reason(tok):
    p = parser(tok, tool_choice=NAMED_CALC)
    assert p.sampling() == {"json_schema": CALC_TOOL["function"]["parameters"]}
    reply = p.parse('{ "expression" : "12*7" }')
    assert reply.content is None and reply.finish_reason_override is None
    [call] = reply.tool_calls
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "12*7"}'}


@pytest.mark.parametrize("choice", ["required", NAMED_CALC])
def test_cut_constrained_answer_stays_content(tok, choice):
    p = parser(tok, tool_choice=choice)
    cut = '[{"name": "calculator", "parameters": {"expre' if choice == "required" else '{"expre'
    reply = p.parse(cut)
    assert reply.content == cut and reply.tool_calls == [] and reply.finish_reason_override is None


def test_free_choices_ask_no_constraint(tok):
    assert parser(tok).sampling() == {} and parser(tok, tool_choice="none").sampling() == {}
    hermes = '<tool_call>\n{"name": "clock", "arguments": {}}\n</tool_call>'
    assert parser(tok, tool_choice="none").parse(hermes).tool_calls == []


@pytest.mark.parametrize("choice", ["required", NAMED_CALC])
def test_constrained_stream_holds_everything_until_parsed(tok, choice):
    p = parser(tok, tool_choice=choice)
    text = '{"expression": "1"}' if choice == NAMED_CALC else '[{"name": "clock", "parameters": {}}]'
    streamer = p.streamer()
    assert "".join(streamer.push(ch) for ch in text) == ""
    assert streamer.rest(p.parse(text)) == ""
    streamer = p.streamer()
    assert "".join(streamer.push(ch) for ch in text[:5]) == ""
    assert streamer.rest(p.parse(text[:5])) == text[:5]


def test_schema_the_grammar_backend_cannot_compile_is_a_400(tok):
    bad = copy.deepcopy(PICK_TOOL)
    bad["function"]["parameters"]["properties"]["op"] = {"type": "strin"}
    with pytest.raises(GatewayError) as info:
        parser(tok, tools=[bad], tool_choice="required")
    assert info.value.status == 400 and info.value.param == "tools"
    assert info.value.message.endswith('Unsupported type "strin"')
    assert parser(tok, tools=[bad]).sampling() == {}  # "auto" does not constrain: nothing to compile


def test_engine_sampling_bounds_whitespace_of_the_json_answer():
    """The engine gets the schema as an xgrammar structural tag, which bounds whitespace runs; xgrammar compiles
    it and holds answers to both the schema and the bound."""
    schema = PICK_TOOL["function"]["parameters"]
    params = sampling_params({"temperature": 0.0, "max_tokens": 8, "json_schema": schema}, stream=False)
    tag = json.loads(params.structured_outputs.structural_tag)
    assert tag["format"] == {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 4}
    compiled = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo([])).compile_structural_tag(json.dumps(tag))

    def allowed(text: str) -> bool:
        matcher = xgrammar.GrammarMatcher(compiled)
        return matcher.accept_string(text) and matcher.is_completed()

    assert allowed('{"op":"add"}') and allowed('{\n  "op": "mul"\n}')
    assert not allowed('{"op":     "add"}') and not allowed('{"op": "div"}')
    assert sampling_params({"max_tokens": 8, "json_schema": None}, stream=True).structured_outputs is None
