"""The `optimize:` section: what `lightning-ray optimize` searches or selects, and the editor model it uses.

Without `candidates` it improves the prompt `prompt` (its starting text is `prompts.<prompt>`) by a beam search
of critique-and-rewrite steps; with `candidates` it selects among them by successive halving instead. Either
way every candidate is scored on the validation split through the rollout stack (`lightning_ray.optimize`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lightning_ray.config.sections import Section


class EditorConfig(Section):
    """The critic and editor: any OpenAI-compatible chat endpoint; unset, the served policy itself."""

    base_url: str | None = Field(
        None, description="e.g. https://api.openai.com/v1; unset: the policy, through the run's own gateway."
    )
    model: str | None = Field(None, description="The model name sent to base_url (required with it).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding base_url's API key (never the key itself)."
    )
    temperature: float = Field(0.8, ge=0, description="Sampling temperature of critiques and rewrites.")
    max_tokens: int = Field(256, gt=0, description="The longest critique or rewritten prompt, in tokens.")

    @model_validator(mode="after")
    def _endpoint_fields(self) -> EditorConfig:
        if self.base_url is None:
            for name in ("model", "api_key_env"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"optimize.editor.{name}: set without optimize.editor.base_url (unset, the editor is "
                        "the served policy)"
                    )
        elif not self.model:
            raise ValueError(
                "optimize.editor.model: required with optimize.editor.base_url (the model that endpoint serves)"
            )
        return self


class OptimizeConfig(Section):
    prompt: str = Field("system", min_length=1, description="The named prompt searched (`llm.prompt(name)`).")
    beam_width: int = Field(2, gt=0, description="Prompts kept after each round, the best scores first.")
    rounds: int = Field(2, ge=0, description="Critique-and-rewrite rounds of the beam search.")
    minibatch_size: int = Field(
        4, gt=0, description="Training-split tasks each beam prompt runs; its failures go to the critic."
    )
    candidates_per_step: int = Field(
        2, gt=0, description="Rewrites the editor proposes per beam prompt per round."
    )
    val_limit: int | None = Field(
        None, gt=0, description="Score candidates on the validation split's first N tasks (None: all)."
    )
    budget: int | None = Field(
        None, gt=0, description="The most candidates the search scores, the starting prompt included."
    )
    metric: Literal["reward", "success"] = Field(
        "reward",
        description="What ranks candidates: the mean reward, or the share of rollouts that reach "
        "trainer.success_threshold.",
    )
    candidates: list[str] = Field(
        default_factory=list,
        description="Select among these by successive halving instead of searching: prompt texts "
        "(select: prompts) or model paths and checkpoints (select: models).",
    )
    select: Literal["prompts", "models"] = Field("prompts", description="What `candidates` lists.")
    editor: EditorConfig = EditorConfig()

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[str]) -> list[str]:
        if twice := sorted({c for c in candidates if candidates.count(c) > 1}):
            raise ValueError(f"listed twice: {twice}; each candidate once")
        return candidates
