"""The `LLM` resource a rollout receives: where to send OpenAI-compatible requests, and how to sample."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_ray.agent.urls import check_role, parse_rollout_url, rollout_url
from lightning_ray.config import SamplingConfig

# Sampling arguments of OpenAI's own API; any other setting (e.g. top_k) is a vLLM extension sent in `extra_body`.
OPENAI_SAMPLING_ARGS = frozenset(
    {"temperature", "top_p", "max_tokens", "seed", "stop", "presence_penalty", "frequency_penalty"}
)


@dataclass(frozen=True, init=False)
class LLM:
    """An OpenAI-compatible endpoint scoped to one rollout (and optionally one agent role).

    Pass `base_url` and `api_key` to any client (`openai.AsyncOpenAI(base_url=llm.base_url,
    api_key=llm.api_key)`), use `model` as the model name and `sampling_kwargs()` for the sampling settings
    the run was configured with; each setting is also an attribute (`llm.temperature`, `llm.max_tokens`, every
    field of `SamplingConfig`). The rollout's identity lives in the URL path, so every call made through it,
    by any framework, is recorded for that rollout. `prompt(name)` is the text of a named prompt: the config's
    `prompts` section, or the candidate `lightning-ray optimize` is scoring.
    """

    base_url: str
    api_key: str = field(default="EMPTY", repr=False)  # the gateway's bearer token when it needs one
    model: str = ""
    sampling: SamplingConfig = field(default_factory=SamplingConfig, hash=False)
    prompts: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __init__(
        self,
        base_url: str,
        api_key: str = "EMPTY",
        model: str = "",
        sampling: SamplingConfig | None = None,
        prompts: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> None:
        """`settings` are sampling settings (`temperature=0.7`, ...) over those of `sampling`; unknown or
        out-of-range ones are a ValueError. `prompts`: the named prompts `prompt(name)` returns."""
        base = sampling.model_dump() if sampling is not None else {}
        object.__setattr__(self, "base_url", base_url)
        object.__setattr__(self, "api_key", api_key)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "sampling", SamplingConfig.model_validate({**base, **settings}))
        object.__setattr__(self, "prompts", dict(prompts or {}))

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not attributes: the sampling settings.
        if name in SamplingConfig.model_fields and "sampling" in self.__dict__:
            return getattr(self.sampling, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def for_rollout(cls, gateway_url: str, rollout_id: str, **kwargs: Any) -> LLM:
        """The LLM of one rollout on a gateway at `gateway_url` (e.g. `http://127.0.0.1:8000`); `kwargs` go to
        the constructor."""
        return cls(base_url=rollout_url(gateway_url, rollout_id), **kwargs)

    @property
    def rollout_id(self) -> str | None:
        """The rollout this endpoint is scoped to, or None for a plain (non-gateway) URL."""
        url = parse_rollout_url(self.base_url)
        return url.rollout_id if url else None

    @property
    def role(self) -> str | None:
        """The agent role calls are recorded under, or None for the rollout's default agent."""
        url = parse_rollout_url(self.base_url)
        return url.role if url else None

    def for_agent(self, role: str) -> LLM:
        """The same rollout's endpoint, with calls recorded as made by agent `role` (multi-agent training)."""
        check_role(role)
        url = parse_rollout_url(self.base_url)
        if url is None:
            raise ValueError(
                f"base_url {self.base_url!r} is not a rollout URL (…/rollout/<id>/v1), so it cannot address a role"
            )
        return dataclasses.replace(self, base_url=rollout_url(url.root, url.rollout_id, role))

    def prompt(self, name: str, default: str | None = None) -> str:
        """The text of the prompt `name`: the candidate being scored when `lightning-ray optimize` searches it,
        else the config's `prompts.<name>`, else `default` (the agent's own text, so an agent runs unchanged
        without any config). Neither set is a KeyError naming the prompt."""
        text = self.prompts.get(name, default)
        if text is None:
            raise KeyError(
                f"prompt {name!r}: not set; set prompts.{name} in the config or give the agent a default "
                f"(llm.prompt({name!r}, default=...))"
            )
        return text

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `client.chat.completions.create(...)` carrying the configured sampling: OpenAI's
        own arguments as they are, the others in `extra_body` where they differ from the engine default."""
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in self.sampling.model_dump().items():
            if name in OPENAI_SAMPLING_ARGS:
                kwargs[name] = value
            elif value != SamplingConfig.model_fields[name].default:
                extra[name] = value
        if extra:
            kwargs["extra_body"] = extra
        return kwargs
