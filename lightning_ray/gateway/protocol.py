"""OpenAI request bodies (validated, unknown parameters allowed) and OpenAI-style error bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class GatewayError(Exception):
    """An error answered with an OpenAI-style JSON body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _default_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 503:
        return "service_unavailable"
    return "invalid_request_error" if status < 500 else "server_error"


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"part {i}: only text content parts are supported, got {kind!r}")
        return content

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template sees it: text parts joined, missing content as ''."""
        message = self.model_dump(exclude_none=True)
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message["content"] = content or ""
        return message


class SamplingRequest(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported: one choice per call keeps the recorded trace exact")
        return n

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s] or None

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


TOOL_CHOICE_MODES = ("none", "auto", "required")
NAMED_TOOL_CHOICE = '{"type": "function", "function": {"name": "..."}}'


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, choice: Any) -> Any:
        if choice is None or choice in TOOL_CHOICE_MODES or _named_function(choice) is not None:
            return choice
        raise ValueError(f'use "none", "auto", "required" or {NAMED_TOOL_CHOICE}')

    def forced_function(self) -> str | None:
        """The function a named `tool_choice` forces the model to call, else None."""
        return _named_function(self.tool_choice)


def _named_function(choice: Any) -> str | None:
    """The name in `{"type": "function", "function": {"name": name}}`, or None if `choice` is not that."""
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported: the returned text is exactly the generated tokens")
        return echo

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of is not None and best_of != 1:
            raise ValueError("only best_of=1 is supported")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this call; a batch of several prompts is an error (one choice per call)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise GatewayError(
                    400, "a batch of prompts is not supported: send one prompt per call", param="prompt"
                )
            prompt = prompt[0]
        if len(prompt) == 0:
            raise GatewayError(400, "prompt is empty", param="prompt")
        return prompt


def validation_error(err: ValidationError) -> GatewayError:
    """The first problem of a request body, naming the field (e.g. `messages.0.content`)."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or None
    kind = first["type"]
    if kind == "missing":
        message = f"missing required field '{param}'"
    else:
        message = f"invalid field '{param}': {first['msg'].removeprefix('Value error, ')}"
    return GatewayError(400, message, param=param)


def _is_union_tag(part: str | int) -> bool:
    """Pydantic names the union member that failed (`str`, `list[TextPart]`) in the location; drop it."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)
