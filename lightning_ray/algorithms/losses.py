"""Token-level losses: PPO-clip with asymmetric clipping, KL to a reference, off-policy correction (truncated
IS, decoupled PPO), metrics; and the supervised loss of `algorithm.name: sft` (`sft_loss`).

Every function is pure torch on `[batch, tokens]` tensors plus a 0/1 `mask` of the tokens that count
(response tokens). Nothing here knows about DeepSpeed or Ray, so the maths is unit-tested by hand.

Length normalisation (`length_norm`) decides the divisor of the summed token losses:

- "token":    the number of response tokens in the batch (token-mean over the batch, DAPO);
- "sequence": each sequence's token-mean, then the mean over sequences (the original GRPO);
- "constant": the number of sequences times a constant token budget (Dr. GRPO: no per-length bias).

A learner that splits a batch into micro-batches and ranks passes `denominator` computed on the whole batch
(see `loss_denominator`), so the sum of micro-batch losses equals the loss of the batch.
"""

from __future__ import annotations

import math

import torch

from lightning_ray.config import AlgorithmConfig

LENGTH_NORMS = ("token", "sequence", "constant")
MAX_LOG_RATIO = 20.0  # |log r| above this is clamped (zero gradient there): r <= 4.9e8, finite in float32


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked entries; 0 when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_max(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over masked entries; -inf (the identity of max) when the mask is empty."""
    picked = values[mask > 0]
    return picked.max() if picked.numel() else values.new_tensor(-math.inf)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = exp(-k1) - 1 + k1 (unbiased, always >= 0).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"algorithm.kl_estimator: unknown estimator {estimator!r}")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution for each position (last dim = vocabulary), in float32."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, slot: torch.Tensor | None = None
) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32.

    With `slot` (same shape as `targets`), `logits` is `[K, V]` and target t is scored by row `slot[t]`: the
    packed learner's layout, where one position may predict the next token of several rows. `log_softmax`
    with a float32 `dtype` reads bfloat16 logits once and has a fused backward: on a CPU it took about half
    the time of the float32 copy, `logsumexp` and gather it replaces (1,300 x 49,152 logits, forward and
    backward: 0.7 vs 1.3 s on one thread).
    """
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    if slot is None:
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp[slot, targets]


def loss_denominator(mask: torch.Tensor, length_norm: str, constant: float | None = None) -> torch.Tensor:
    """The divisor of the summed token losses for this batch (see the module docstring)."""
    if length_norm == "token":
        return mask.sum()
    sequences = (mask.sum(-1) > 0).sum()
    if length_norm == "sequence":
        return sequences.to(mask.dtype)
    if length_norm == "constant":
        if constant is None:
            raise ValueError("length_norm='constant' needs a constant token budget (max response tokens)")
        return sequences.to(mask.dtype) * constant
    raise ValueError(f"algorithm.length_norm: unknown option {length_norm!r}; expected one of {LENGTH_NORMS}")


def truncate_ratio(ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """Value min(ratio, cap), but the gradient of a truncated token is cap * grad log pi (truncated IS),
    not zero as `clamp` would give: the token still counts, with a bounded weight."""
    over = ratio.detach() > cap
    capped = cap * ratio / ratio.detach().clamp(min=1e-30)
    return torch.where(over, capped, ratio)


def importance_weight(
    proximal: torch.Tensor, behaviour: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached w = min(pi_prox / pi_behav, cap) per token and where it was truncated. Computed in log space,
    so no log-prob gap (-0.1 against -50, or against -inf) can overflow: w <= cap by construction."""
    log_w = (proximal - behaviour).detach()
    log_cap = math.log(cap)
    return torch.exp(torch.clamp(log_w, max=log_cap)), log_w > log_cap


def policy_loss(
    algo: AlgorithmConfig,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    behaviour_logprobs: torch.Tensor | None = None,
    denominator: float | torch.Tensor | None = None,
    constant: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip token loss (to minimise) and detached metrics, with the clip range, length norm, KL and
    off-policy settings of `algo`.

    r = exp(logprobs - old_logprobs) (the log-ratio clamped to +-20 as in verl, so exp never overflows);
    per token
        loss_t = w_t * max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) + kl_coef * KL_t
    summed over masked tokens and divided by `denominator` (default: computed from this batch; `constant` is
    the token budget of `length_norm: constant`). `advantages` is per sequence `[B]` or per token `[B, T]`.
    KL_t is computed when `ref_logprobs` is given (never importance-weighted). By `algo.old_logprobs`:

    - recompute: `old_logprobs` are the learner's, recomputed before the update; w = 1.
    - rollout: `old_logprobs` are the rollout engine's (behaviour) log-probs, w = 1, and the unclipped r is
      truncated at `tis_cap` (`truncate_ratio`): truncated importance sampling, the V-trace truncation of
      IMPALA (Espeholt et al. 2018) applied to the engine/learner mismatch as in Yao et al. 2025, "Your
      efficient RL framework secretly brings you off-policy RL training".
    - decoupled: decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy optimization"; the
      objective of AReaL, Fu et al. 2025, arXiv 2505.24298). `old_logprobs` are the proximal policy's (the
      learner's before this step's update), so the clip is a trust region around it however stale the
      rollout, and w = min(pi_prox / pi_behav, tis_cap), detached, with pi_behav = `behaviour_logprobs` (the
      rollout's), corrects for the policy that generated the token (`importance_weight`).

    Metrics are token-means over the mask: `pg_loss`, `kl`, `ratio`, `clip_frac` (tokens whose clipped branch
    is active, so they get no gradient), `clip_frac_low` / `clip_frac_high` (its two sides); for rollout and
    decoupled also the importance weight the loss applied (the truncated ratio's value for rollout, w for
    decoupled): `is_weight_mean`, its extremes `is_weight_max` / `is_weight_min` (over the mask; -inf / +inf
    when it is empty: metrics ending in `_max` / `_min` are combined by max / min, not averaged) and
    `tis_frac`, the fraction of tokens truncated at the cap.
    """
    clip_low, clip_high, mode = algo.clip_low, algo.clip_high, algo.old_logprobs
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = truncate_ratio(ratio, algo.tis_cap) if mode == "rollout" else ratio
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(-adv * unclipped, -adv * clipped)
    weight = truncated = None
    if mode == "decoupled":
        if behaviour_logprobs is None:
            raise ValueError("old_logprobs='decoupled' needs the behaviour (rollout) log-probs")
        weight, truncated = importance_weight(old_logprobs, behaviour_logprobs, algo.tis_cap)
        pg = weight * pg
    elif mode == "rollout":
        weight, truncated = ratio.detach().clamp(max=algo.tis_cap), ratio.detach() > algo.tis_cap
    per_token = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, algo.kl_estimator)
        if algo.kl_coef:
            per_token = per_token + algo.kl_coef * kl

    if denominator is None:
        denominator = loss_denominator(mask, algo.length_norm, constant)
    if algo.length_norm == "sequence":
        lengths = mask.sum(-1).clamp(min=1)
        loss = ((per_token * mask).sum(-1) / lengths).sum() / denominator
    else:
        loss = masked_sum(per_token, mask) / denominator

    with torch.no_grad():
        high = (adv > 0) & (ratio > 1.0 + clip_high)
        low = (adv < 0) & (ratio < 1.0 - clip_low)
        metrics = {
            "pg_loss": masked_mean(pg, mask),
            "ratio": masked_mean(ratio, mask),
            "clip_frac": masked_mean((high | low).to(mask.dtype), mask),
            "clip_frac_high": masked_mean(high.to(mask.dtype), mask),
            "clip_frac_low": masked_mean(low.to(mask.dtype), mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
        if weight is not None:
            metrics.update(
                is_weight_mean=masked_mean(weight, mask),
                is_weight_max=masked_max(weight, mask),
                is_weight_min=-masked_max(-weight, mask),
                tis_frac=masked_mean(truncated.to(mask.dtype), mask),
            )
    return loss, {k: v.detach() for k, v in metrics.items()}


def sft_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, *, denominator: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean negative log-likelihood of the tokens the model generated (to minimise):

        loss = -sum_t mask_t * log pi(y_t | y_<t) / sum_t mask_t

    `mask` is 1 on generated tokens and 0 elsewhere (prompt, tool results, inserted turns, padding), so those
    tokens add nothing to the loss and get no gradient. `denominator` is the global count of generated tokens
    when a batch is split over micro-batches and ranks (`loss_denominator(mask, "token")` of the whole batch).
    Metric: `nll`, the token-mean NLL of this micro-batch (exp(nll) is its perplexity)."""
    mask = mask.to(logprobs.dtype)
    if denominator is None:
        denominator = loss_denominator(mask, "token").clamp(min=1)
    loss = -masked_sum(logprobs, mask) / denominator
    return loss, {"nll": -masked_mean(logprobs.detach(), mask)}
