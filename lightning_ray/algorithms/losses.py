"""Token-level policy losses: PPO-clip with asymmetric clipping, KL to a reference, truncated IS, metrics.

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

import torch

LENGTH_NORMS = ("token", "sequence", "constant")


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked entries; 0 when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


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


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32, without materialising the full log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    length_norm: str = "token",
    denominator: float | torch.Tensor | None = None,
    constant: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip token loss (to minimise) and detached metrics.

    ratio = exp(logprobs - old_logprobs); per token
        loss_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) + kl_coef * KL_t
    summed over masked tokens and divided by `denominator` (default: computed from this batch).
    `advantages` is per sequence `[B]` or per token `[B, T]`. With `tis_cap` (old log-probs taken from the
    rollout engine), the unclipped ratio is truncated at the cap (see `truncate_ratio`).

    Metrics are token-means over the mask: `pg_loss`, `kl`, `ratio`, `clip_frac` (tokens whose clipped branch
    is active, so they get no gradient), `clip_frac_low` / `clip_frac_high` (its two sides), `tis_frac`.
    """
    if length_norm not in LENGTH_NORMS:
        raise ValueError(
            f"algorithm.length_norm: unknown option {length_norm!r}; expected one of {LENGTH_NORMS}"
        )
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = truncate_ratio(ratio, tis_cap) if tis_cap is not None else ratio
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg1 = -adv * unclipped
    pg2 = -adv * clipped
    pg = torch.maximum(pg1, pg2)
    per_token = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        if kl_coef:
            per_token = per_token + kl_coef * kl

    if denominator is None:
        denominator = loss_denominator(mask, length_norm, constant)
    if length_norm == "sequence":
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
        if tis_cap is not None:
            metrics["tis_frac"] = masked_mean((ratio > tis_cap).to(mask.dtype), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}
