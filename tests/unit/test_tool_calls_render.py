"""Tool calling pieces on the real SmolLM2 tokenizer and vLLM's real hermes parser: template, parse, stream,
round trip of generated tool calls through the splice."""

from __future__ import annotations

import json

import pytest

from lightning_ray.gateway.protocol import ChatCompletionRequest
from lightning_ray.gateway.render import PriorCall, decode, encode, render_chat, splice_prompt
from lightning_ray.gateway.tools import (
    ContentStreamer,
    ToolCallParser,
    load_parser_class,
    restore_generated,
    shipped_tools_template,
    template_for,
)
from lightning_ray.models import builtin_tokenizer_dir
from tests.tools import CALC_TOOL

QUESTION = [{"role": "user", "content": "What is 12 * 7?"}]
GENERATED = (
    'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*7"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tok():
    from lightning_ray.gateway.render import load_tokenizer

    return load_tokenizer(builtin_tokenizer_dir())


def request(messages: list[dict], **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": messages, "tools": [CALC_TOOL], **kw})


def parser(tok, **kw) -> ToolCallParser:
    return ToolCallParser(load_parser_class("hermes"), tok, request(QUESTION, **kw))


def test_shipped_template_equals_smollm2_without_tools(tok):
    conversations = [
        QUESTION,
        [{"role": "system", "content": "S"}, *QUESTION, {"role": "assistant", "content": "84"}, *QUESTION],
    ]
    for messages in conversations:
        assert render_chat(tok, messages, chat_template=shipped_tools_template()) == render_chat(
            tok, messages
        )


def test_tools_render_schemas_only_with_the_tools_template(tok):
    template = template_for(tok, None, request(QUESTION))
    assert template == shipped_tools_template()
    text = render_chat(tok, QUESTION, chat_template=template, tools=[CALC_TOOL])
    assert json.dumps(CALC_TOOL) in text and "<tool_call>" in text
    assert text.endswith("<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n")
    plain = ChatCompletionRequest.model_validate({"messages": QUESTION})
    assert template_for(tok, None, plain) is None
    assert template_for(tok, "configured", request(QUESTION)) == "configured"


def test_hermes_parse_gives_openai_tool_calls(tok):
    reply = parser(tok).parse(GENERATED)
    assert reply.content == "Let me compute.\n"
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "12*7"}
    assert reply.finish_reason_override == "tool_calls"


def test_text_without_tool_call_and_tool_choice_none(tok):
    assert parser(tok).parse("84").tool_calls == []
    reply = parser(tok, tool_choice="none").parse(GENERATED)
    assert reply.content == GENERATED and reply.tool_calls == []


def test_streamed_content_is_the_parsed_content(tok):
    p = parser(tok)
    streamer = p.streamer()
    sent = "".join(streamer.push(ch) for ch in GENERATED)
    reply = p.parse(GENERATED)
    assert sent + streamer.rest(reply) == reply.content
    plain = "no tools <tool here"
    streamer = p.streamer()
    sent = "".join(streamer.push(ch) for ch in plain)
    assert sent + streamer.rest(p.parse(plain)) == plain


def test_streamer_holds_a_partial_start_tag():
    streamer = ContentStreamer("<tool_call>", buffer_all=True)
    assert streamer.push("abc<tool") == "abc"
    assert streamer.push("_c") == ""
    assert streamer.push("all>{") == ""


def test_generated_tool_call_round_trips_into_a_spliced_prompt(tok):
    """The client sends the assistant tool call and the tool result back: the new prompt reuses the exact
    ids the model generated (sampled char by char here, so re-tokenizing would differ)."""
    template = shipped_tools_template()
    first_text = render_chat(tok, QUESTION, chat_template=template, tools=[CALC_TOOL])
    generated_ids = [i for ch in GENERATED for i in encode(tok, ch)] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    assert generated_ids[:-1] != encode(tok, GENERATED)
    prior = PriorCall(
        call_index=0,
        prompt_text=first_text,
        prompt_ids=tuple(encode(tok, first_text)),
        response_ids=tuple(generated_ids),
        raw_response_text=decode(tok, generated_ids, skip_special_tokens=False),
    )
    reply = parser(tok).parse(decode(tok, generated_ids))
    call_id = reply.tool_calls[0]["id"]
    sent_back = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": reply.tool_calls},
        {"role": "tool", "tool_call_id": call_id, "content": "84"},
    ]
    messages = restore_generated(sent_back, {call_id: decode(tok, generated_ids)})
    assert "tool_calls" not in messages[1]
    text = render_chat(tok, messages, chat_template=template, tools=[CALC_TOOL])
    assert "<tool_response>\n84\n</tool_response>" in text
    prompt = splice_prompt(tok, text, [prior])
    assert prompt.spliced_from == 0
    assert prompt.ids[: len(prior.prompt_ids) + len(generated_ids)] == [*prior.prompt_ids, *generated_ids]


def test_unknown_tool_calls_render_through_the_template(tok):
    call = {"id": "x1", "type": "function", "function": {"name": "calculator", "arguments": '{"a": 1}'}}
    messages = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]}]
    assert restore_generated(messages, {"other": "text"}) == messages
    text = render_chat(tok, messages, chat_template=shipped_tools_template(), tools=[CALC_TOOL])
    assert '<tool_call>\n{"name": "calculator", "arguments": {"a": 1}}\n</tool_call><|im_end|>' in text


def test_unknown_parser_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tool parser"):
        load_parser_class("no-such-parser")
