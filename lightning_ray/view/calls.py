"""One rollout's LLM calls as the trajectory browser shows them, and one GRPO group's samples side by side.

A call is recorded as token ids (`lightning_ray.data.schema`), so its prompt is shown by decoding them with the
run's tokenizer (special tokens kept: the chat template as rendered), split into its chat turns; the turns that
are new since the role's previous call are where tool results and follow-up messages land. The response is
`response_text`, exactly the text the agent received, and token by token with each token's log-prob. Without
the tokenizer (a run directory copied to a machine without the model) prompts show as ids.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.config import Config, ConfigError, load_config

# ChatML turns (SmolLM2's template and the shipped hermes-style tools template, `gateway/templates`).
TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|$)", re.DOTALL)
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
TOOL_RESPONSE = re.compile(r"<tool_response>\s*(.*?)\s*</tool_response>", re.DOTALL)


@dataclass
class Turn:
    role: str
    text: str
    new: bool = False  # not in the prompt of the role's previous call
    tool_results: list[str] = field(default_factory=list)


@dataclass
class Token:
    text: str
    logprob: float
    version: int

    @property
    def shade(self) -> float:
        """0 for a token the policy was sure of, towards 1 the less likely it was (1 - its probability)."""
        return round(1.0 - math.exp(min(self.logprob, 0.0)), 3)


@dataclass
class CallView:
    row: dict[str, Any]
    turns: list[Turn]
    tokens: list[Token]
    tool_calls: list[str]

    @property
    def versions(self) -> str:
        versions = sorted(set(self.row["response_versions"]))
        return ", ".join(map(str, versions)) or str(self.row["policy_version"])


def run_config(run_dir: Path) -> Config | None:
    """The run's resolved config (config.yaml beside its outputs), or None when it is missing or invalid."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        return load_config(path, check_files=False)
    except ConfigError:
        return None


def run_model_path(run_dir: Path) -> str | None:
    """`model.path` of the run's config.yaml, read without validating the rest (a run of another version)."""
    try:
        return str(yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


@functools.cache
def run_tokenizer(model_path: str) -> Any | None:
    """The tokenizer of `model.path`, or None when it cannot be found here."""
    from lightning_ray.gateway.render import load_tokenizer
    from lightning_ray.models import resolve_model

    try:
        return load_tokenizer(resolve_model(model_path))
    except Exception:  # a copied run directory: the model is elsewhere; prompts show as ids
        return None


def call_views(rows: list[dict[str, Any]], tokenizer: Any | None) -> list[CallView]:
    """Views of one rollout's calls (in call order)."""
    previous: dict[str, list[int]] = {}  # role -> prompt + response ids of its last call
    views = []
    for row in rows:
        prompt_ids, response_ids = list(row["prompt_ids"]), list(row["response_ids"])
        prior = previous.get(row["agent"], [])
        shared = len(prior) if prompt_ids[: len(prior)] == prior else 0
        previous[row["agent"]] = prompt_ids + response_ids
        views.append(
            CallView(
                row=row,
                turns=_turns(tokenizer, prompt_ids, shared),
                tokens=_tokens(tokenizer, response_ids, row["response_logprobs"], row["response_versions"]),
                tool_calls=TOOL_CALL.findall(row["response_text"] or ""),
            )
        )
    return views


def _turns(tokenizer: Any | None, ids: list[int], shared: int) -> list[Turn]:
    """The prompt's chat turns; those after the first `shared` ids (the previous call's prompt and response)
    are marked new."""
    if tokenizer is None:
        return [Turn("prompt ids", " ".join(map(str, ids)), new=True)]
    from lightning_ray.gateway.render import decode

    text = decode(tokenizer, ids, skip_special_tokens=False)
    old_chars = len(decode(tokenizer, ids[:shared], skip_special_tokens=False)) if shared else 0
    turns = [
        Turn(m.group(1), m.group(2), new=m.end(2) > old_chars, tool_results=TOOL_RESPONSE.findall(m.group(2)))
        for m in TURN.finditer(text)
    ]
    return turns or [Turn("prompt", text, new=True)]


def _tokens(tokenizer: Any | None, ids: list[int], logprobs: list[float], versions: list[int]) -> list[Token]:
    if tokenizer is None:
        texts = [f"[{i}]" for i in ids]
    else:
        from lightning_ray.gateway.calls import token_texts

        texts = token_texts(tokenizer, ids)
    return [Token(t, float(lp), int(v)) for t, lp, v in zip(texts, logprobs, versions, strict=True)]


def group_rows(calls: pa.Table, cfg: Config | None, rollouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One GRPO group's samples side by side: each rollout's reward, advantage (as the run's algorithm computes
    it, zero-variance groups kept so their zero advantage shows) and final answer."""
    advantage: dict[str, list[float]] = {}
    if calls.num_rows and cfg is not None:
        algorithm = cfg.algorithm.model_copy(update={"drop_zero_variance": False})
        table, _ = compute_advantages(calls, algorithm)
        for rid, adv in zip(table["rollout_id"].to_pylist(), table["advantage"].to_pylist(), strict=True):
            advantage.setdefault(rid, []).append(adv)
    last_text: dict[str, str] = {}
    if calls.num_rows:
        order = calls.sort_by("call_index")
        for rid, text in zip(
            order["rollout_id"].to_pylist(), order["response_text"].to_pylist(), strict=True
        ):
            last_text[rid] = text or ""
    out = []
    for r in rollouts:
        advs = sorted(set(advantage.get(r["rollout_id"], [])))
        out.append({**r, "advantages": advs, "last_response": last_text.get(r["rollout_id"], "")})
    return sorted(out, key=lambda r: -(r["reward"] if r["reward"] is not None else -math.inf))
