"""The token-exact OpenAI-compatible gateway: agents talk OpenAI, the trace gets the engine's token ids.

Routes (`app.py`): `/rollout/{id}/v1/{chat/completions,completions,models}` and the same under
`/rollout/{id}/agent/{role}/v1/...` (the URL format and the id and role rules: `lightning_ray.agent.urls`). A
call is recorded under agent role: the route's `{role}`, else the request's `model` when it is not the served
model's name, else "default".

Modules: `server` (start/stop as a sidecar or in a thread), `standalone` (`lightning-ray serve`), `app`
(routes, streaming), `guards` (bearer token, size limit), `calls` (request -> transition), `render` (chat
template, splice, incremental decode), `prompt_cache` (a prompt rendered and tokenized once, not per call),
`tools` (tool schemas in the template, vLLM tool-call parsers, exact round trip of generated tool calls;
`templates/smollm2_tools.jinja`), `recorder` (per-rollout traces), `engine` (Ray Serve handle), `protocol`
(request models, errors), `responses` (OpenAI bodies and chunks).
"""

from lightning_ray.gateway.calls import DEFAULT_ROLE
from lightning_ray.gateway.recorder import UnknownRollout
from lightning_ray.gateway.responses import POLICY_VERSION_HEADER
from lightning_ray.gateway.server import Gateway, start_gateway, start_gateway_thread
from lightning_ray.gateway.standalone import describe, serve_gateway

__all__ = [
    "DEFAULT_ROLE",
    "POLICY_VERSION_HEADER",
    "Gateway",
    "UnknownRollout",
    "describe",
    "serve_gateway",
    "start_gateway",
    "start_gateway_thread",
]
