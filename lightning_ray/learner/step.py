"""One train step on a rank's shard, read top to bottom like CleanRL's ppo.py update:

    micro-batches -> old and reference log-probs -> for each optimizer step: forward -> policy_loss ->
    backward, then step.

`algorithm.name: sft` takes the same step with `sft_loss` (the NLL of the generated tokens) in place of
`policy_loss`, and nothing to compute before it: the objective (`_Objective`) is all that differs.

Old log-probs are recomputed before any update (`old_logprobs: recompute`), taken from the rollout with
truncated importance sampling (`rollout`), or both (`decoupled`: the recomputed ones are the proximal policy
the ratio is clipped around, the rollout's the behaviour policy the importance weight corrects for). With
`learner.gradient_accumulation_steps` unset the whole batch is one optimizer step; with k, every k
micro-batches per rank are one (PPO mini-batches). The loss of each micro-batch is its share of the global
batch (the denominator is summed over the ranks), so ranks and micro-batch sizes do not change the step.
Everything here is collective: every rank runs it at once.

An optimizer step whose loss (any micro-batch, any rank) or gradients are not finite is skipped by every rank
(`skip_nonfinite`): no weight or optimizer state changes, the gradients are cleared, and the metrics count it
(`skipped_steps`, and by reason `skipped_nonfinite_loss` / `skipped_nonfinite_grad`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lightning_ray.algorithms.losses import loss_denominator, policy_loss, sft_loss
from lightning_ray.config import AlgorithmConfig, LearnerConfig
from lightning_ray.learner.forward import (
    all_reduce,
    computed_tokens,
    forward_logprobs,
    micro_batches,
    to_device,
)

Batch = dict[str, torch.Tensor]


def train_step(
    engine: Any,
    shard: pa.Table,
    cfg: LearnerConfig,
    algo: AlgorithmConfig,
    *,
    pad_id: int,
    reference: Callable[[], torch.nn.Module],
    max_response_tokens: int | None = None,
) -> dict[str, float]:
    """One step on `shard` (with an `advantage` column, but for sft); global metrics, the same on every rank.

    `reference` returns the frozen KL reference model (loaded on first use). `max_response_tokens` is the
    Dr. GRPO constant for `length_norm: constant` (default: the longest response in the batch). The count
    `optimizer_steps` holds the steps applied, not those skipped.
    """
    import torch.distributed as dist

    t0 = time.perf_counter()
    device = engine.device
    engine.train()
    micro = [to_device(b, device) for b in micro_batches(shard, pad_id, cfg, device)]
    if not micro:  # no rows on any rank: nothing to learn from (the count is global, so all ranks agree)
        return {
            "loss": 0.0,
            "tokens": 0.0,
            "tokens_computed": 0.0,
            "sequences": 0.0,
            "micro_batches": 0,
            "optimizer_steps": 0,
            **_skip_counts([], []),
        }
    t_batch = time.perf_counter() - t0

    gas = cfg.gradient_accumulation_steps or len(micro)
    if algo.name == "sft":
        objective = _Objective(_sft_micro_loss)
    else:
        objective = _policy_objective(engine, micro, algo, reference, gas, max_response_tokens)
    t_old = time.perf_counter() - t0 - t_batch

    totals = _Totals()
    for chunk in (micro[i : i + gas] for i in range(0, len(micro), gas)):  # one optimizer step each
        denominator = _global_denominator(chunk, objective.length_norm, objective.constant, device)
        for b in chunk:
            logp, entropy = forward_logprobs(engine, b, with_entropy=True)
            loss, metrics, recomputed = objective.loss(b, logp, denominator)
            totals.add(b, loss, metrics, entropy, recomputed)
            # DeepSpeed averages gradients over ranks; the loss is already a share of the global batch.
            engine.backward(skip_nonfinite(loss) * dist.get_world_size(), scale_wrt_gas=False)
        totals.end_optimizer_step(_optimizer_step(engine), engine.get_global_grad_norm())

    out = totals.reduce(device)
    out.update(
        lr=float(engine.get_lr()[0]),
        micro_batches=len(micro),
        old_logprob_pass=float(objective.separate_pass),  # 0: the training forward's own are the old ones
        time_batch_s=t_batch,
        time_old_logprobs_s=t_old,
        time_s=time.perf_counter() - t0,
    )
    return out


MicroLoss = Callable[
    [Batch, torch.Tensor, float], tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]
]


@dataclass
class _Objective:
    """What a micro-batch's loss is, given its forward's response log-probs and its optimizer step's
    denominator: `loss` returns (loss, metrics, the old log-probs the learner recomputed or None).
    `length_norm` and `constant` make the denominator; `separate_pass` says whether the old log-probs took a
    forward pass of their own."""

    loss: MicroLoss
    length_norm: str = "token"
    constant: float | None = None
    separate_pass: bool = False


def _sft_micro_loss(b: Batch, logp: torch.Tensor, denominator: float) -> tuple[Any, ...]:
    """`algorithm.name: sft`: NLL of the generated tokens (`sft_loss`), nothing to compute beforehand."""
    return *sft_loss(logp, b["response_mask"], denominator=denominator), None


def _policy_objective(
    engine: Any,
    micro: list[Batch],
    algo: AlgorithmConfig,
    reference: Callable[[], torch.nn.Module],
    gas: int,
    max_response_tokens: int | None,
) -> _Objective:
    """PPO-clip (`policy_loss`), after the old and reference log-probs are stored in each micro-batch."""
    recomputed = algo.old_logprobs != "rollout"  # recompute and decoupled: the learner's own old log-probs
    decoupled = algo.old_logprobs == "decoupled"
    separate_pass = recomputed and gas < len(micro)
    _old_and_ref_logprobs(engine, micro, algo, reference, separate_pass=separate_pass)
    constant = _length_constant(micro, algo, max_response_tokens, engine.device)

    def loss(b: Batch, logp: torch.Tensor, denominator: float) -> tuple[Any, ...]:
        old = b["old_logprobs"] if "old_logprobs" in b else logp.detach()
        value, metrics = policy_loss(
            algo,
            logp,
            old,
            b["advantages"],
            b["response_mask"],
            behaviour_logprobs=b["rollout_logprobs"] if decoupled else None,
            denominator=denominator,
            constant=constant,
            ref_logprobs=b.get("ref_logprobs"),
        )
        return value, metrics, old if recomputed else None

    return _Objective(loss, algo.length_norm, constant, separate_pass)


def skip_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """The loss to backpropagate: a non-finite loss becomes NaN times itself, so every gradient it reaches is
    NaN. The global gradient norm, which DeepSpeed reduces over the ranks before it applies a step, is then NaN
    on every rank, and every rank skips the step (see `engine`), even where this loss alone would have left
    the gradients finite."""
    return loss if bool(torch.isfinite(loss)) else loss * math.nan


def _optimizer_step(engine: Any) -> bool:
    """`engine.step()`; whether it applied the update (False: the gradient norm was not finite, so DeepSpeed or
    `ClippedAdamW` skipped it and cleared the gradients; the same verdict on every rank)."""
    skipped = engine.skipped_steps
    engine.step()
    return engine.skipped_steps == skipped


def _skip_counts(applied: list[bool], nonfinite_losses: list[float]) -> dict[str, int]:
    """Skipped optimizer steps, by reason: a non-finite loss on some rank, else non-finite gradients."""
    skipped = [bad for ok, bad in zip(applied, nonfinite_losses, strict=True) if not ok]
    return {
        "skipped_steps": len(skipped),
        "skipped_nonfinite_loss": sum(bad > 0 for bad in skipped),
        "skipped_nonfinite_grad": sum(bad == 0 for bad in skipped),
    }


def _old_and_ref_logprobs(
    engine: Any,
    micro: list[Batch],
    algo: AlgorithmConfig,
    reference: Callable[[], torch.nn.Module],
    *,
    separate_pass: bool,
) -> None:
    """Store each micro-batch's old log-probs and, with a KL term, its reference log-probs in the batch.

    With one optimizer step per train step the weights do not change before the last backward, so the
    training forward's own detached log-probs *are* the recomputed old (proximal) log-probs: no
    `separate_pass`, and no `old_logprobs` entry (the step takes them from its forward).
    """
    with torch.no_grad():
        for b in micro:
            if separate_pass:
                b["old_logprobs"], _ = forward_logprobs(engine, b)
            elif algo.old_logprobs == "rollout":
                b["old_logprobs"] = b["rollout_logprobs"]
            if algo.kl_coef > 0:
                b["ref_logprobs"], _ = forward_logprobs(reference(), b)


def _length_constant(
    micro: list[Batch], algo: AlgorithmConfig, max_response_tokens: int | None, device: torch.device
) -> float | None:
    """The Dr. GRPO token budget for `length_norm: constant` (None for the other norms)."""
    if algo.length_norm != "constant":
        return None
    longest = max(int(b["response_lengths"].max()) for b in micro)
    return max_response_tokens or all_reduce([longest], device, "max")[0]


def _global_denominator(
    chunk: list[Batch], length_norm: str, constant: float | None, device: torch.device
) -> float:
    """The loss divisor of one optimizer step's micro-batches over all ranks (at least 1)."""
    local = sum(float(loss_denominator(b["response_mask"], length_norm, constant)) for b in chunk)
    (total,) = all_reduce([local], device)
    return max(total, 1.0)


@dataclass
class _Totals:
    """Token-weighted sums of the micro-batch metrics on this rank, reduced over the ranks at the end.

    Metrics named `*_max` / `*_min` (see `policy_loss`) are extremes, not means: kept as a running max (of
    the value, or of its negation for `*_min`) and reduced with a max over the ranks.
    """

    sums: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)  # `*_min` metrics negated
    tokens: float = 0.0  # response tokens that carry loss
    computed: float = 0.0  # token positions the forward passes computed (shared once, padding included)
    sequences: float = 0.0
    loss: float = 0.0
    mismatch: float = 0.0  # sum of |learner - inference engine| old log-probs over the response tokens
    mismatch_tokens: float = 0.0
    grad_norms: list[float] = field(default_factory=list)  # per optimizer step, global
    applied: list[bool] = field(default_factory=list)  # per optimizer step, the same on every rank
    nonfinite_losses: list[float] = field(default_factory=lambda: [0.0])  # per optimizer step, this rank's

    def add(
        self,
        b: Batch,
        loss: torch.Tensor,
        metrics: dict[str, torch.Tensor],
        entropy: torch.Tensor,
        recomputed: torch.Tensor | None,
    ) -> None:
        mask = b["response_mask"]
        n = float(mask.sum())
        if recomputed is not None:  # learner (before this step's update) vs inference engine log-probs
            self.mismatch += float(((recomputed - b["rollout_logprobs"]).abs() * mask).sum())
            self.mismatch_tokens += n
        metrics["entropy"] = entropy.sum() / max(n, 1.0)
        for k, v in metrics.items():
            if k.endswith(("_max", "_min")):
                signed = -float(v) if k.endswith("_min") else float(v)
                self.maxima[k] = max(self.maxima.get(k, -math.inf), signed)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.tokens += n
        self.computed += float(computed_tokens(b))
        self.sequences += float((b["response_lengths"] > 0).sum())
        value = loss.item()
        self.loss += value
        self.nonfinite_losses[-1] += not math.isfinite(value)

    def end_optimizer_step(self, applied: bool, grad_norm: float | None) -> None:
        self.applied.append(applied)
        self.grad_norms.append(math.nan if grad_norm is None else float(grad_norm))
        self.nonfinite_losses.append(0.0)

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Global token-means of the loss metrics, the mean loss per optimizer step, the mean grad norm and the
        optimizer steps applied and skipped."""
        keys = sorted(self.sums)
        local = [self.sums[k] for k in keys]
        reduced = all_reduce(
            [
                *local,
                self.tokens,
                self.computed,
                self.sequences,
                self.loss,
                self.mismatch,
                self.mismatch_tokens,
                *self.nonfinite_losses[:-1],
            ],
            device,
        )
        end = len(keys) + 6
        tokens, computed, sequences, loss, mismatch, mismatch_tokens = reduced[len(keys) : end]
        out = {k: v / max(tokens, 1.0) for k, v in zip(keys, reduced[: len(keys)], strict=True)}
        extremes = sorted(self.maxima)  # the same keys on every rank: they depend on the config only
        if extremes:
            top = all_reduce([self.maxima[k] for k in extremes], device, "max")
            if tokens > 0:  # else every extreme is the empty one, +-inf
                out.update({k: -v if k.endswith("_min") else v for k, v in zip(extremes, top, strict=True)})
        out.update(
            loss=loss / len(self.grad_norms),
            grad_norm=float(np.mean(self.grad_norms)),
            tokens=tokens,
            tokens_computed=computed,
            sequences=sequences,
            optimizer_steps=sum(self.applied),
            **_skip_counts(self.applied, reduced[end:]),
        )
        if mismatch_tokens > 0:
            out["logprob_diff_rollout"] = (
                mismatch / mismatch_tokens
            )  # learner vs inference engine, mean |delta|
        return out
