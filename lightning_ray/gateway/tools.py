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
- Streaming: content is streamed up to where a tool call may start (the parser's start tag); tool calls are
  parsed from the full text when generation ends and sent as one delta each (id, name, whole arguments).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """The assistant's answer as the client sees it."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finish_reason_override(self) -> str | None:
        return "tool_calls" if self.tool_calls else None


class ToolCallParser:
    """One call's parser: vLLM's parser over the request's tools."""

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
                    "tool_choice": _choice(req),
                }
            )
        except Exception as err:
            raise GatewayError(400, f"invalid tools: {err}", param="tools") from err
        self.parser = parser_class(tokenizer, self.request.tools)
        self.enabled = req.tool_choice != "none"
        self.start_tag: str | None = getattr(self.parser, "tool_call_start_token", None)

    def parse(self, text: str) -> Reply:
        if not self.enabled:
            return Reply(content=text)
        info = self.parser.extract_tool_calls(text, self.request)
        if not info.tools_called:
            return Reply(content=text)
        calls = [c.model_dump(exclude_none=True) for c in info.tool_calls]
        return Reply(content=info.content, tool_calls=calls)

    def streamer(self) -> ContentStreamer:
        return ContentStreamer(self.start_tag if self.enabled else None, buffer_all=self.enabled)


def _choice(req: ChatCompletionRequest) -> str | dict[str, Any]:
    """vLLM applies guided decoding for `required`/named choices; here the model's free output is parsed."""
    choice = req.tool_choice
    return "auto" if choice is None or choice != "none" else "none"


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
