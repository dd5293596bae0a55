"""OpenAI response bodies and stream chunks for chat and text completions.

Non-standard: every body and chunk carries `policy_version`, the policy that generated it: a chunk of tokens,
the version of those tokens; a body, the header `X-Policy-Version` and the other chunks, the version the call
started on (a call interrupted by a weight update goes on under the new version, and its chunks say so).
"""

from __future__ import annotations

import json
import secrets
import time
from abc import ABC, abstractmethod
from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_ray.gateway.calls import Call, Generation, token_texts, usage
from lightning_ray.gateway.tools import Reply

POLICY_VERSION_HEADER = "X-Policy-Version"


class Formatter(ABC):
    """Shapes one call's response; `ChatFormatter` and `CompletionFormatter` differ only in the choice."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, call: Call, tokenizer: PreTrainedTokenizerBase):
        self.call, self.tokenizer = call, tokenizer
        self.id = self.id_prefix + secrets.token_hex(12)
        self.created = int(time.time())

    def body(self, gen: Generation, reply: Reply) -> dict[str, Any]:
        """The whole answer; the reply may override `finish_reason` (e.g. "tool_calls"; the recorded one stays
        the engine's)."""
        content = self._content(reply.content, final=True)
        if reply.tool_calls:
            content["message"]["tool_calls"] = reply.tool_calls
        finish = reply.finish_reason_override or gen.finish_reason
        choice = {"index": 0, **content, "finish_reason": finish}
        choice["logprobs"] = self._logprobs(gen.response_ids, gen.response_logprobs)
        return self._envelope(self.object_name, [choice], gen.policy_version, usage=usage(self.call, gen))

    def opening_chunks(self, policy_version: int) -> list[str]:
        return []

    def chunk(self, text: str, ids: list[int], logprobs: list[float], policy_version: int) -> str:
        choice = {"index": 0, **self._content(text, final=False), "finish_reason": None}
        choice["logprobs"] = self._logprobs(ids, logprobs)
        return self._sse(self._envelope(self.chunk_object_name, [choice], policy_version, usage=None))

    def tool_calls_chunk(self, tool_calls: list[dict[str, Any]], policy_version: int) -> str:
        """All tool calls of the answer, each whole (id, name, complete arguments) under its index."""
        deltas = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choice = {"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None}
        return self._sse(self._envelope(self.chunk_object_name, [choice], policy_version, usage=None))

    def final_chunk(self, gen: Generation, finish_reason: str | None = None) -> str:
        finish = finish_reason or gen.finish_reason
        choice = {"index": 0, **self._empty_delta(), "logprobs": None, "finish_reason": finish}
        return self._sse(self._envelope(self.chunk_object_name, [choice], gen.policy_version, usage=None))

    def usage_chunk(self, gen: Generation) -> str:
        return self._sse(
            self._envelope(self.chunk_object_name, [], gen.policy_version, usage=usage(self.call, gen))
        )

    @staticmethod
    def error_event(error_body: dict[str, Any]) -> str:
        return Formatter._sse(error_body)

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"

    def _envelope(self, obj: str, choices: list, policy_version: int, usage: dict | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.call.model,
            "choices": choices,
            "usage": usage,
            "policy_version": policy_version,
        }

    @staticmethod
    def _sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    @abstractmethod
    def _content(self, text: str | None, final: bool) -> dict[str, Any]: ...

    @abstractmethod
    def _empty_delta(self) -> dict[str, Any]: ...

    @abstractmethod
    def _logprobs(self, ids: list[int], logprobs: list[float]) -> dict[str, Any] | None: ...


class ChatFormatter(Formatter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def opening_chunks(self, policy_version: int) -> list[str]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self._sse(self._envelope(self.chunk_object_name, [choice], policy_version, usage=None))]

    def _content(self, text: str | None, final: bool) -> dict[str, Any]:
        if final:
            return {"message": {"role": "assistant", "content": text}}
        return {"delta": {"content": text}}

    def _empty_delta(self) -> dict[str, Any]:
        return {"delta": {}}

    def _logprobs(self, ids: list[int], logprobs: list[float]) -> dict[str, Any] | None:
        if not self.call.logprobs:
            return None
        entries = [
            {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": []}
            for tok, lp in zip(token_texts(self.tokenizer, ids), logprobs, strict=True)
        ]
        return {"content": entries}


class CompletionFormatter(Formatter):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def _content(self, text: str | None, final: bool) -> dict[str, Any]:
        return {"text": text or ""}

    def _empty_delta(self) -> dict[str, Any]:
        return {"text": ""}

    def _logprobs(self, ids: list[int], logprobs: list[float]) -> dict[str, Any] | None:
        if not self.call.logprobs:
            return None
        tokens = token_texts(self.tokenizer, ids)
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": list(logprobs),
            "top_logprobs": None,
            "text_offset": offsets,
        }
