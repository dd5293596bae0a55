"""The `live:` section: learning from live traffic (`lightning-ray serve CONFIG --learn`, `lightning_ray.live`).

A slice of live rollouts (`group_fraction`) gets `group_size - 1` extra completions of its first request,
sampled in the background and never returned to the client, so that GRPO has groups to compare; the extras are
rewarded by `scorer` (a `module:function` reward function) or by an LLM judge (`judge_url`). Rollouts outside
that slice are singleton groups: a group-relative advantage is zero for them, so they are recorded and their
rewards reach `lightning_ray.live.hooks`, but they are not trained.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from lightning_ray.config.sections import Section


class LiveConfig(Section):
    reward_deadline_s: float = Field(
        300.0,
        gt=0,
        description="Seconds after a live rollout's last call (or its opening, before any) within which its "
        "reward must arrive; after it the rollout is dropped (reason reward_deadline, in RUN_DIR/live.jsonl and "
        "the ledger).",
    )
    group_fraction: float = Field(
        0.25, ge=0, le=1, description="The share of live rollouts that get extra samples and so train."
    )
    group_size: int = Field(
        4, ge=2, description="Rollouts per live group: the client's own and group_size - 1 extra samples."
    )
    scorer: str | None = Field(
        None,
        description="module:function rewarding an extra sample: fn(prompt: str, completion: str) -> float, "
        "prompt being the rendered prompt text.",
    )
    judge_url: str | None = Field(
        None,
        description="An OpenAI-compatible base URL (…/v1) of an LLM judge rewarding extra samples (0..1) "
        "instead of `scorer`.",
    )
    judge_model: str = Field("judge", description="The judge's model name.")
    judge_api_key: str = Field("EMPTY", description="The judge's API key.")
    score_user: bool = Field(
        False,
        description="Reward the client's own completion with the scorer too (at its first call) instead of "
        "waiting for the reward the client posts.",
    )

    @model_validator(mode="after")
    def _one_scorer(self) -> LiveConfig:
        if self.scorer is not None and self.judge_url is not None:
            raise ValueError("live.scorer and live.judge_url: set one of them, not both")
        if self.scorer is not None and ":" not in self.scorer:
            raise ValueError(f"live.scorer: {self.scorer!r} is not module:function")
        return self

    @property
    def has_scorer(self) -> bool:
        return self.scorer is not None or self.judge_url is not None
