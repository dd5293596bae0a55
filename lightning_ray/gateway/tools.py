"""Tool calling: chat template with tool schemas in, OpenAI `tool_calls` out, exact ids across turns.

- Template: a configured `model.chat_template` always wins. Otherwise a request that carries tools (or tool
  messages) is rendered with the tokenizer's own template when that template knows tools, else with the
  shipped hermes-style `templates/smollm2_tools.jinja` (SmolLM2's template plus tools; identical without them).
- Parsing: vLLM's tool-call parser named by `model.tool_parser` (default `hermes`, matching the shipped
  template) turns the text the client receives into `content` + `tool_calls`. The recorded transition is the
  engine's ids either way; parsing only shapes the answer.
- Round trip: each tool call id handed out is remembered with the exact text the model generated. When the
  client sends that assistant message back (`tool_calls` with those ids), it is rendered as that text, so the
  next prompt starts with the previous prompt + the generated ids and the splice in `render.py` reuses them.
- `tool_choice` follows OpenAI's semantics the way vLLM's server implements them. "auto" (the default with
  tools): the model's free text is parsed. "none": tools are still rendered into the prompt (vLLM's default) but
  the text is never parsed into calls. "required" and a named function constrain generation with a JSON schema
  built from the tools (vLLM structured outputs, passed to the engine as sampling `json_schema`; the engine also
  bounds runs of whitespace, see `inference/server.py`): for "required" an array of `{"name", "parameters"}`
  objects, one per call (at most one with `parallel_tool_calls: false`); for a named function its arguments
  object. A schema xgrammar cannot compile is a 400 naming `tools`. The constrained text is read as exactly
  those calls; text that does not parse (cut by max_tokens) is returned as content, without tool calls.
- Streaming: content is streamed up to where a tool call may start (the parser's start tag; under a constraint
  the whole text is the call, so nothing); tool calls are parsed from the full text when generation ends and sent
  as one delta each (id, name, whole arguments).
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from lightning_ray.gateway.protocol import ChatCompletionRequest, GatewayError

DEFAULT_TOOL_PARSER = "hermes"
TOOLS_TEMPLATE = Path(__file__).parent / "templates" / "smollm2_tools.jinja"

_parser_lock = threading.Lock()
_parser_classes: dict[str, type] = {}


def load_parser_class(name: str) -> type:
    """vLLM's tool parser class `name` (importing vLLM's parsers takes seconds: call it off the event loop)."""
    with _parser_lock:
        if name not in _parser_classes:
            from vllm.tool_parsers import ToolParserManager

            try:
                _parser_classes[name] = ToolParserManager.get_tool_parser(name)
            except KeyError:
                known = ", ".join(ToolParserManager.list_registered())
                raise ValueError(f"unknown tool parser {name!r}; vLLM knows: {known}") from None
        return _parser_classes[name]


def wants_tools(req: ChatCompletionRequest) -> bool:
    """Whether the request needs tool rendering: tools offered, or tool calls/results in the history."""
    if req.tools:
        return True
    return any(m.role == "tool" or getattr(m, "tool_calls", None) for m in req.messages)


def template_for(
    tokenizer: PreTrainedTokenizerBase, configured: str | None, req: ChatCompletionRequest
) -> str | None:
    """The chat template text for this request (None: the tokenizer's own)."""
    if configured is not None or not wants_tools(req):
        return configured
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if own is not None and "tools" in own:
        return None
    return shipped_tools_template()


_template_cache: list[str] = []


def shipped_tools_template() -> str:
    if not _template_cache:
        _template_cache.append(TOOLS_TEMPLATE.read_text())
    return _template_cache[0]


def restore_generated(messages: list[dict[str, Any]], generated: dict[str, str]) -> list[dict[str, Any]]:
    """Assistant messages whose tool calls this gateway produced become the exact text the model generated.

    `generated` maps tool call id -> generated text (`Recorder.tool_texts`). A message is restored only when all its
    tool call ids are known and come from one generation; anything else renders through the template.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        texts = {generated.get(c.get("id", "")) for c in calls or []}
        if calls and len(texts) == 1 and None not in texts:
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = texts.pop()
        out.append(message)
    return out


@dataclass
class Reply:
    """The assistant's answer as the client sees it; `finish_reason_override` replaces the engine's finish
    reason ("tool_calls" when "auto" or "required" produced calls; a named function keeps "stop", as OpenAI does)."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason_override: str | None = None


@dataclass(frozen=True)
class ToolChoice:
    """What a request lets the model do with its tools; `function` is set for mode "function" only."""

    mode: Literal["none", "auto", "required", "function"]
    function: str | None = None

    @property
    def constrained(self) -> bool:
        """Whether generation is constrained to tool calls (the whole answer is the call)."""
        return self.mode in ("required", "function")


def tool_choice(req: ChatCompletionRequest) -> ToolChoice:
    """The request's `tool_choice` checked against its tools; unset means "auto" with tools, "none" without."""
    choice, forced = req.tool_choice, req.forced_function()
    if choice is None:
        return ToolChoice("auto" if req.tools else "none")
    if (choice == "required" or forced is not None) and not req.tools:
        raise GatewayError(400, "tool_choice requires tools: none are offered", param="tool_choice")
    if forced is None:
        return ToolChoice(choice)
    names = [_function_of(tool).get("name") for tool in req.tools or []]
    if forced not in names:
        raise GatewayError(
            400,
            f"invalid field 'tool_choice.function.name': {forced!r} is not one of the tools offered "
            f"({', '.join(repr(n) for n in names)})",
            param="tool_choice.function.name",
        )
    return ToolChoice("function", forced)


def _function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The `function` object of an OpenAI tool (empty when malformed; vLLM's validation names the problem)."""
    function = tool.get("function") if isinstance(tool, dict) else None
    return function if isinstance(function, dict) else {}


def constraint_schema(
    tools: list[dict[str, Any]], choice: ToolChoice, parallel_tool_calls: bool | None = None
) -> dict[str, Any] | None:
    """The JSON schema generation must follow under `choice`, or None when it is free.

    The same shapes as vLLM's server: a named function's arguments object; for "required" a non-empty array
    of `{"name": <one tool's name>, "parameters": <its arguments>}`. `$defs` inside the tools' parameters move to
    the array's root, where their `#/$defs/...` references resolve.
    """
    if choice.mode == "function":
        function = next(_function_of(t) for t in tools if _function_of(t).get("name") == choice.function)
        return _arguments_schema(function.get("parameters"))
    if choice.mode != "required":
        return None
    items, defs = [], {}
    for tool in tools:
        function = _function_of(tool)
        parameters = copy.deepcopy(function.get("parameters") or {})
        _merge_defs(defs, parameters.pop("$defs", {}), function.get("name"))
        items.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [function.get("name")]},
                    "parameters": _arguments_schema(parameters),
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _arguments_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A tool's parameters schema; a tool without parameters still takes a JSON object."""
    return parameters if parameters else {"type": "object", "properties": {}}


def _merge_defs(into: dict[str, Any], defs: Any, tool_name: Any) -> None:
    if not isinstance(defs, dict):
        raise GatewayError(400, f"tool {tool_name!r}: parameters.$defs must be an object", param="tools")
    for name, schema in defs.items():
        if into.setdefault(name, schema) != schema:
            raise GatewayError(
                400,
                f"tool {tool_name!r}: parameters.$defs.{name} differs from another tool's definition of it; "
                "tool_choice 'required' needs one schema per name",
                param="tools",
            )


def _check_grammar(schema: dict[str, Any]) -> None:
    """A schema the engine's grammar backend (xgrammar) cannot compile is the request's fault: 400, not 502."""
    import xgrammar

    try:
        xgrammar.Grammar.from_json_schema(json.dumps(schema))
    except Exception as err:
        raise GatewayError(
            400, f"the tools' parameters cannot constrain generation: {_xgrammar_reason(err)}", param="tools"
        ) from err


_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[01:07:21] /project/cpp/x.cc:83: "


def _xgrammar_reason(err: Exception) -> str:
    """xgrammar's message without its time and source location prefix."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return _XGRAMMAR_LOCATION.sub("", lines[0])


def tool_call_parser(
    parser_name: str, tokenizer: PreTrainedTokenizerBase, req: ChatCompletionRequest
) -> ToolCallParser | None:
    """The call's tool handling; None when the request offers no tools (`tool_choice` is still checked: without
    tools only "auto" and "none" are valid)."""
    if not req.tools:
        tool_choice(req)
        return None
    return ToolCallParser(load_parser_class(parser_name), tokenizer, req)


class ToolCallParser:
    """One call's tool handling: the constraint for the engine and the reading of the answer into tool calls.

    "auto" answers are parsed by vLLM's parser over the request's tools; constrained answers are JSON by
    construction and read directly.
    """

    def __init__(self, parser_class: type, tokenizer: PreTrainedTokenizerBase, req: ChatCompletionRequest):
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as VllmChatRequest,
        )

        try:
            self.request = VllmChatRequest.model_validate(
                {
                    "model": req.model or "model",
                    "messages": [],
                    "tools": req.tools,
                    "tool_choice": "none" if req.tool_choice == "none" else "auto",
                }
            )
        except Exception as err:
            raise GatewayError(400, f"invalid tools: {err}", param="tools") from err
        self.choice = tool_choice(req)
        self.schema = constraint_schema(req.tools or [], self.choice, req.parallel_tool_calls)
        if self.schema is not None:
            _check_grammar(self.schema)
        self.parser = parser_class(tokenizer, self.request.tools)
        self.start_tag: str | None = getattr(self.parser, "tool_call_start_token", None)

    def sampling(self) -> dict[str, Any]:
        """What the engine's sampling needs for this choice: the JSON schema of a constrained answer."""
        return {} if self.schema is None else {"json_schema": self.schema}

    def parse(self, text: str) -> Reply:
        if self.choice.mode == "none":
            return Reply(content=text)
        if self.choice.constrained:
            return self._read_constrained(text)
        info = self.parser.extract_tool_calls(text, self.request)
        if not info.tools_called:
            return Reply(content=text)
        calls = [c.model_dump(exclude_none=True) for c in info.tool_calls]
        return Reply(content=info.content, tool_calls=calls, finish_reason_override="tool_calls")

    def _read_constrained(self, text: str) -> Reply:
        """The calls in a constrained answer; an answer that is not complete JSON (cut short) stays content."""
        try:
            value = json.loads(text)
        except ValueError:
            return Reply(content=text)
        if self.choice.mode == "function":
            return Reply(content=None, tool_calls=[_tool_call(self.choice.function, value)])
        if not _is_call_list(value):
            return Reply(content=text)
        calls = [_tool_call(item["name"], item["parameters"]) for item in value]
        return Reply(content=None, tool_calls=calls, finish_reason_override="tool_calls")

    def streamer(self) -> ContentStreamer:
        if self.choice.mode == "none":
            return ContentStreamer(None, buffer_all=False)
        return ContentStreamer(None if self.choice.constrained else self.start_tag, buffer_all=True)


def _is_call_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(v, dict) and isinstance(v.get("name"), str) and "parameters" in v for v in value)
    )


def _tool_call(name: str | None, arguments: Any) -> dict[str, Any]:
    """An OpenAI tool call, shaped and named like the ones vLLM's parsers produce."""
    return {
        "id": f"chatcmpl-tool-{secrets.token_hex(8)}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class ContentStreamer:
    """Streams the content part of a reply that may end in tool calls.

    Text is passed on up to the parser's tool-call start tag (a suffix that may be the start of that tag is
    held back). Without a known tag, everything is held until the end (`buffer_all`).
    """

    def __init__(self, start_tag: str | None, buffer_all: bool):
        self.start_tag, self.buffer_all = start_tag, buffer_all
        self.text = ""
        self.sent = ""

    def push(self, delta: str) -> str:
        self.text += delta
        if self.start_tag is None:
            return "" if self.buffer_all else self._send(len(self.text))
        at = self.text.find(self.start_tag)
        end = at if at >= 0 else len(self.text) - _partial_overlap(self.text, self.start_tag)
        return self._send(end)

    def rest(self, reply: Reply) -> str:
        """Content of the final reply not yet streamed."""
        content = reply.content or ""
        return content[len(self.sent) :] if content.startswith(self.sent) else ""

    def _send(self, end: int) -> str:
        if end <= len(self.sent):
            return ""
        delta = self.text[len(self.sent) : end]
        self.sent = self.text[:end]
        return delta


def _partial_overlap(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
