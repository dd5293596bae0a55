"""A rank's micro-batches and the forward pass that turns one into response log-probs.

Every rank pads its micro-batch count to the largest one over the ranks (with empty batches), so that ZeRO's
gathers and reductions line up: each forward and backward is then collective on all ranks at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from lightning_ray.algorithms.losses import token_entropy, token_logprobs
from lightning_ray.learner.batch import padding_batch, split_micro_batches, table_to_batch


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) of `values` over the learner ranks, in float64."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def micro_batches(
    table: pa.Table, pad_id: int, size: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches (on the CPU), padded with empty ones to the largest count over the ranks."""
    micro = [table_to_batch(t, pad_id) for t in split_micro_batches(table, size)]
    (n,) = all_reduce([len(micro)], device, "max")
    micro += [padding_batch(pad_id) for _ in range(int(n) - len(micro))]
    return micro


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, R]` of the response tokens (and their entropies) from one forward pass.

    Only the last R + 1 positions get logits (`logits_to_keep`); masked positions are zeroed with `where`
    so a padded position can never leak a NaN into the loss.
    """
    r = batch["targets"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=r + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]
    mask = batch["response_mask"] > 0
    logp = torch.where(mask, token_logprobs(logits, batch["targets"]), 0.0)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.where(mask, token_entropy(logits.detach()), 0.0)
    return logp, entropy


def response_logprobs(engine: torch.nn.Module, micro: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    """Each row's response log-probs (float32, unpadded) under the engine's current weights. Collective."""
    engine.eval()
    out: list[np.ndarray] = []
    with torch.no_grad():
        for b in micro:
            lengths = b["response_lengths"].tolist()
            lp, _ = forward_logprobs(engine, to_device(b, engine.device))
            lp = lp.float().cpu().numpy()
            out.extend(lp[i, lp.shape[1] - n :].copy() for i, n in enumerate(lengths))
    engine.train()
    return out
