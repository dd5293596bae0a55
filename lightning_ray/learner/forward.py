"""A rank's micro-batches and the forward pass that turns one into response log-probs.

With `learner.packing` (the default) a micro-batch is one prefix-shared sequence of at most
`learner.max_tokens_per_micro_batch` computed tokens (`learner.packing`); without it, `micro_batch_size`
left-padded rows (`learner.batch`). Either way the forward returns the same right-aligned `[B, R]` response
log-probs, so the loss never knows which layout it was given. Every rank pads its micro-batch count to the
largest one over the ranks (with empty batches), so that ZeRO's gathers and reductions line up: each forward
and backward is then collective on all ranks at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from lightning_ray.algorithms.losses import token_entropy, token_logprobs
from lightning_ray.config import LearnerConfig
from lightning_ray.learner.batch import padding_batch, split_micro_batches, table_to_batch
from lightning_ray.learner.packing import attention_inputs, pack_batch, row_sequences, split_by_tokens

Batch = dict[str, torch.Tensor]


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) of `values` over the learner ranks, in float64."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def micro_batches(table: pa.Table, pad_id: int, cfg: LearnerConfig, device: torch.device) -> list[Batch]:
    """This rank's micro-batches (on the CPU), padded with empty ones to the largest count over the ranks.
    Each carries `row_index`: the shard rows it holds, in its own row order."""
    if cfg.packing:
        rows = split_by_tokens(row_sequences(table)[0], cfg.max_tokens_per_micro_batch)
        micro = [pack_batch(table.take(r), pad_id) | {"row_index": torch.tensor(r)} for r in rows]
    else:
        slices = split_micro_batches(table, cfg.micro_batch_size)
        starts = np.cumsum([0] + [t.num_rows for t in slices])
        micro = [
            table_to_batch(t, pad_id) | {"row_index": torch.arange(s, s + t.num_rows)}
            for t, s in zip(slices, starts, strict=False)
        ]
    (n,) = all_reduce([len(micro)], device, "max")
    micro += [padding_batch(pad_id, cfg.packing) for _ in range(int(n) - len(micro))]
    return micro


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def computed_tokens(batch: Batch) -> int:
    """Token positions the forward pass computes for this micro-batch, padding and shared tokens included."""
    return batch["input_ids"].numel()


def forward_logprobs(
    model: torch.nn.Module, batch: Batch, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, R]` of the response tokens (and their entropies) from one forward pass.

    Only positions that predict a response token get logits (`logits_to_keep`); masked positions are zeroed
    with `where` so a padded position can never leak a NaN into the loss.
    """
    mask = batch["response_mask"] > 0
    if "logit_index" in batch:  # packed: logits at the nodes that predict a response token, once each
        keep = torch.unique(batch["logit_index"][mask])
        if not len(keep):  # an empty (rank-padding) batch still runs the forward, for ZeRO's collectives
            keep = batch["logit_index"].new_zeros(1)
        out = model(
            input_ids=batch["input_ids"],
            **attention_inputs(model, batch["subtree_end"]),
            position_ids=batch["position_ids"],
            logits_to_keep=keep,
            use_cache=False,
        )
        logits = out.logits[0]  # [K, V]
        slot = torch.searchsorted(keep, batch["logit_index"]).clamp(max=len(keep) - 1)
    else:  # padded: responses are right-aligned, so the last R + 1 positions hold every predictor
        r = batch["targets"].shape[1]
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=r + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1, :]
        slot = None
    logp = torch.where(mask, token_logprobs(logits, batch["targets"], slot), 0.0)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            per_position = token_entropy(logits.detach())
            entropy = torch.where(mask, per_position if slot is None else per_position[slot], 0.0)
    return logp, entropy


def response_logprobs(engine: torch.nn.Module, micro: list[Batch], num_rows: int) -> list[np.ndarray]:
    """Each shard row's response log-probs (float32, unpadded, in shard order) under the engine's current
    weights. Collective."""
    engine.eval()
    out: list[np.ndarray] = [np.zeros(0, dtype=np.float32)] * num_rows
    with torch.no_grad():
        for b in micro:
            lp, _ = forward_logprobs(engine, to_device(b, engine.device))
            lp = lp.float().cpu().numpy()
            for i, (row, n) in enumerate(
                zip(b["row_index"].tolist(), b["response_lengths"].tolist(), strict=True)
            ):
                if row >= 0:
                    out[row] = lp[i, lp.shape[1] - n :].copy()
    engine.train()
    return out
