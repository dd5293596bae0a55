"""One LLM call from request to recorded transition, independent of HTTP and of streaming.

`prepare_*` turns a validated request into a `Call` (prompt ids, sampling, call index); `record` stores the
finished generation under the rollout and returns the text the client gets. A streamed call and a plain one go
through the same two functions, so they are recorded identically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from lightning_ray.agent.urls import ROLE, ROLE_RULE
from lightning_ray.config import SamplingConfig
from lightning_ray.data.schema import Transition
from lightning_ray.gateway.engine import Engine
from lightning_ray.gateway.prompt_cache import RenderCache, TokenCache
from lightning_ray.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GatewayError,
    SamplingRequest,
)
from lightning_ray.gateway.recorder import Recorder, UnknownRollout
from lightning_ray.gateway.render import PriorCall, Prompt, decode, splice_prompt
from lightning_ray.gateway.tools import (
    DEFAULT_TOOL_PARSER,
    Reply,
    ToolCallParser,
    restore_generated,
    template_for,
    tool_call_parser,
)

DEFAULT_ROLE = "default"
# What a request may set over the configured sampling (max_tokens is clamped to the context on its own).
REQUEST_SAMPLING_KEYS = (*(k for k in SamplingConfig.model_fields if k != "max_tokens"), "seed")


@dataclass
class GatewayState:
    """Everything the routes need; one per gateway."""

    tokenizer: PreTrainedTokenizerBase
    engine: Engine
    recorder: Recorder
    served_model: str
    max_model_len: int
    chat_template: str | None = None
    tool_parser: str = DEFAULT_TOOL_PARSER
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    render_cache: RenderCache = field(init=False, repr=False)
    token_cache: TokenCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.render_cache = RenderCache(self.tokenizer)
        self.token_cache = TokenCache(self.tokenizer)


@dataclass
class Call:
    rollout_id: str
    role: str
    endpoint: Literal["chat", "completions"]
    model: str
    prompt: Prompt
    sampling: dict[str, Any]
    call_index: int
    logprobs: bool = False
    priority: int = 0  # the engine's scheduling priority (the rollout's, `Recorder.open`)
    tools: ToolCallParser | None = None  # set when the request offers tools
    started_at: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Generation:
    """What the engine produced for one call, whole or as accumulated stream deltas. `policy_version` is the
    version the call started on; `response_versions` the version of each token (a call the engine interrupted
    for a weight update goes on under the new one)."""

    response_ids: list[int] = field(default_factory=list)
    response_logprobs: list[float] = field(default_factory=list)
    response_versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    policy_version: int = -1
    replica: str = ""

    def add(self, delta: dict[str, Any]) -> None:
        """Append a stream delta; its `policy_version` is the version of its tokens."""
        if self.policy_version < 0:
            self.policy_version = delta["policy_version"]
        self.response_ids += delta["response_ids"]
        self.response_logprobs += delta["response_logprobs"]
        self.response_versions += [delta["policy_version"]] * len(delta["response_ids"])
        self.finish_reason = delta.get("finish_reason") or self.finish_reason


def resolve_role(route_role: str | None, model: str | None, served_model: str) -> str:
    """The agent role a call is recorded under.

    1. the route: `/rollout/{id}/agent/{role}/v1/...`;
    2. else the request's `model`, when it is set and is not the served model's name (so a multi-agent program
       can name its agents through the model name it passes, without knowing about routes);
    3. else "default".
    """
    if route_role is not None:
        if not ROLE.match(route_role):
            raise GatewayError(400, f"invalid agent role in the URL: use {ROLE_RULE}")
        return route_role
    if model and model != served_model:
        return model
    return DEFAULT_ROLE


def prepare_chat(
    state: GatewayState, rollout_id: str, route_role: str | None, req: ChatCompletionRequest
) -> Call:
    """Render the conversation (tool calls this gateway produced render as the model's exact text); a
    `tool_choice` that constrains the answer adds its JSON schema to the sampling."""
    history = _history(state, rollout_id)
    tools = tool_call_parser(state.tool_parser, state.tokenizer, req)
    messages = restore_generated([m.to_template() for m in req.messages], _tool_texts(state, rollout_id))
    try:
        text = state.render_cache.render(
            messages,
            chat_template=template_for(state.tokenizer, state.chat_template, req),
            tools=req.tools,
            template_kwargs=req.chat_template_kwargs,
        )
    except Exception as err:
        raise GatewayError(
            400, f"the chat template failed on these messages: {err}", param="messages"
        ) from err
    prompt = splice_prompt(state.tokenizer, text, history, cache=state.token_cache)
    call = _call(state, rollout_id, route_role, req, "chat", prompt, bool(req.logprobs))
    if tools is not None:
        call.tools = tools
        call.sampling.update(tools.sampling())
    return call


def reply_for(state: GatewayState, call: Call, text: str) -> Reply:
    """The client's view of a finished chat call: content and parsed tool calls (remembered for the
    round trip)."""
    if call.tools is None:
        return Reply(content=text)
    reply = call.tools.parse(text)
    if reply.tool_calls:
        state.recorder.remember_tool_calls(call.rollout_id, [c["id"] for c in reply.tool_calls], text)
    return reply


def _tool_texts(state: GatewayState, rollout_id: str) -> dict[str, str]:
    try:
        return state.recorder.tool_texts(rollout_id)
    except UnknownRollout:
        raise unknown_rollout(rollout_id) from None


def prepare_completion(
    state: GatewayState, rollout_id: str, route_role: str | None, req: CompletionRequest
) -> Call:
    history = _history(state, rollout_id)
    raw = req.single_prompt()
    if isinstance(raw, str):
        prompt = splice_prompt(
            state.tokenizer, raw, history, add_special_tokens=True, cache=state.token_cache
        )
    else:
        vocab = len(state.tokenizer)
        bad = next((t for t in raw if not 0 <= t < vocab), None)
        if bad is not None:
            raise GatewayError(
                400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
        prompt = Prompt(text=None, ids=list(raw))
    return _call(state, rollout_id, route_role, req, "completions", prompt, req.logprobs is not None)


def _history(state: GatewayState, rollout_id: str) -> list[PriorCall]:
    try:
        return state.recorder.history(rollout_id)
    except UnknownRollout:
        raise unknown_rollout(rollout_id) from None


def unknown_rollout(rollout_id: str) -> GatewayError:
    shown = rollout_id if len(rollout_id) <= 64 else rollout_id[:64] + "..."
    return GatewayError(
        404,
        f"unknown rollout id {shown!r}: it was never opened or is already closed",
        code="rollout_not_found",
    )


def _call(
    state: GatewayState,
    rollout_id: str,
    route_role: str | None,
    req: SamplingRequest,
    endpoint: Literal["chat", "completions"],
    prompt: Prompt,
    logprobs: bool,
) -> Call:
    role = resolve_role(route_role, req.model, state.served_model)
    sampling = sampling_for(state, req, len(prompt.ids), "messages" if endpoint == "chat" else "prompt")
    try:
        index, priority = state.recorder.reserve(rollout_id)
    except UnknownRollout:
        raise unknown_rollout(rollout_id) from None
    return Call(
        rollout_id,
        role,
        endpoint,
        req.model or state.served_model,
        prompt,
        sampling,
        index,
        logprobs,
        priority=priority,
    )


def sampling_for(
    state: GatewayState, req: SamplingRequest, prompt_len: int, prompt_param: str = "messages"
) -> dict[str, Any]:
    """Engine sampling: the request's values over the configured defaults, max_tokens clamped to fit."""
    room = state.max_model_len - prompt_len
    if room <= 0:
        raise GatewayError(
            400,
            f"This model's maximum context length is {state.max_model_len} tokens; the prompt has {prompt_len} "
            "tokens. Shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    sampling = dict(state.sampling_defaults)
    for key in REQUEST_SAMPLING_KEYS:
        value = getattr(req, key, None)  # a setting SamplingRequest does not declare arrives as an extra
        if value is not None:
            sampling[key] = value
    sampling["stop"] = req.stop_list()
    wanted = req.requested_max_tokens() or sampling.get("max_tokens") or room
    sampling["max_tokens"] = min(wanted, room)
    return sampling


def record(state: GatewayState, call: Call, gen: Generation) -> str:
    """Store the call's transition under its rollout; return the client's text, `decode(response_ids)`.

    Recording happens before the client receives the end of the response, so once an agent has its answer the
    call is in the trace. A rollout closed in the meantime drops the call.
    """
    tok = state.tokenizer
    text = decode(tok, gen.response_ids)
    transition = Transition(
        call_index=call.call_index,
        agent=call.role,
        prompt_ids=list(call.prompt.ids),
        response_ids=list(gen.response_ids),
        response_logprobs=list(gen.response_logprobs),
        response_versions=list(gen.response_versions),
        policy_version=gen.policy_version,
        finish_reason=gen.finish_reason or "stop",
        latency_s=time.perf_counter() - call.t0,
        response_text=text,
        endpoint=call.endpoint,
        model=call.model,
        started_at=call.started_at,
        extra={"spliced_from": call.prompt.spliced_from, "replica": gen.replica},
    )
    prior = None
    if call.prompt.text is not None:
        prior = PriorCall(
            call_index=call.call_index,
            prompt_text=call.prompt.text,
            prompt_ids=tuple(call.prompt.ids),
            response_ids=tuple(gen.response_ids),
            raw_response_text=decode(tok, gen.response_ids, skip_special_tokens=False),
        )
    state.recorder.record(call.rollout_id, transition, prior)
    return text


async def generate(state: GatewayState, call: Call) -> Generation:
    res = await state.engine.generate(
        call.rollout_id, call.prompt.ids, call.sampling, role=call.role, priority=call.priority
    )
    if list(res["prompt_ids"]) != call.prompt.ids:
        raise GatewayError(502, "the inference engine reports other prompt ids than the gateway sent")
    return Generation(
        response_ids=list(res["response_ids"]),
        response_logprobs=list(res["response_logprobs"]),
        response_versions=list(res["response_versions"]),
        finish_reason=res["finish_reason"],
        policy_version=res["policy_version"],
        replica=res.get("replica", ""),
    )


def usage(call: Call, gen: Generation) -> dict[str, int]:
    n_prompt, n_out = len(call.prompt.ids), len(gen.response_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """Each token's own text (for OpenAI `logprobs`)."""
    return [decode(tokenizer, [i], skip_special_tokens=False) for i in ids]
