"""Arrow trajectory table -> padded torch tensors, micro-batches and learner shards, without Python lists.

List columns are read as (flat values, per-row lengths) through Arrow `flatten()` / `list_value_length`, and
scattered into padded matrices with numpy fancy indexing.

Layout: sequences are *left*-padded, so every row's response ends at the last column. The R = longest
response columns at the right hold the response tokens (`targets`, right-aligned too), and the model only
has to produce logits for the last R + 1 positions (`logits_to_keep`): position t predicts token t + 1.
Position ids restart at 0 at each row's first real token, as the inference engine numbers them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lightning_ray.algorithms.advantages import ADVANTAGE_COLUMN
from lightning_ray.data.schema import list_column


def scatter_rows(values: np.ndarray, lengths: np.ndarray, end_cols: np.ndarray, out: np.ndarray) -> None:
    """Write row i's `lengths[i]` values into `out[i, end_cols[i] - lengths[i] : end_cols[i]]`."""
    if len(values) == 0:
        return
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    within = np.arange(len(values)) - np.repeat(starts, lengths)
    cols = np.repeat(end_cols - lengths, lengths) + within
    out[rows, cols] = values


def check_per_token(lengths: np.ndarray, response_len: np.ndarray, what: str) -> None:
    """A per-response-token column must have one entry per response token in every row."""
    if not np.array_equal(lengths, response_len):
        bad = int(np.flatnonzero(lengths != response_len)[0])
        raise ValueError(f"row {bad}: {lengths[bad]} {what} for {response_len[bad]} response tokens")


def response_tensors(table: pa.Table, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The per-response-token tensors of a micro-batch, packed or padded alike.

    Keys: `targets` [B, R] (response ids, right-aligned), `response_mask` [B, R] (float32, 1 on response
    tokens the loss counts: all of them, or only those where a merged row's `loss_mask` is 1, see
    `lightning_ray.data.merge`), `rollout_logprobs` [B, R] (float32, the engine's log-probs), `advantages` [B]
    (float32, zeros when the table has no advantage column), `response_lengths` [B] (int64).
    """
    response, response_len = list_column(table, "response_ids")
    logprobs, logprobs_len = list_column(table, "response_logprobs")
    check_per_token(logprobs_len, response_len, "response log-probs")
    b = table.num_rows
    r = int(response_len.max()) if b else 0
    targets = np.full((b, r), pad_id, dtype=np.int64)
    scatter_rows(response, response_len, np.full(b, r), targets)
    response_mask = (np.arange(r)[None, :] >= (r - response_len)[:, None]).astype(np.float32)
    if "loss_mask" in table.column_names:
        loss_mask, mask_len = list_column(table, "loss_mask")
        check_per_token(mask_len, response_len, "loss_mask entries")
        scatter_rows(loss_mask.astype(np.float32), response_len, np.full(b, r), response_mask)
    rollout_logprobs = np.zeros((b, r), dtype=np.float32)
    scatter_rows(logprobs.astype(np.float32), response_len, np.full(b, r), rollout_logprobs)
    if ADVANTAGE_COLUMN in table.column_names:
        advantages = pc.cast(table.column(ADVANTAGE_COLUMN), pa.float32()).to_numpy().astype(np.float32)
    else:
        advantages = np.zeros(b, dtype=np.float32)
    return {
        "targets": torch.from_numpy(targets),
        "response_mask": torch.from_numpy(response_mask),
        "rollout_logprobs": torch.from_numpy(rollout_logprobs),
        "advantages": torch.from_numpy(advantages),
        "response_lengths": torch.from_numpy(response_len),
    }


def table_to_batch(table: pa.Table, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Padded tensors for one micro-batch: `response_tensors` plus left-padded `input_ids`, `attention_mask`
    and `position_ids` [B, T] (int64). `T >= R + 1` always holds."""
    prompt, prompt_len = list_column(table, "prompt_ids")
    response, response_len = list_column(table, "response_ids")
    if (prompt_len == 0).any():
        raise ValueError("a row has an empty prompt: its first response token has no position to predict it")
    out = response_tensors(table, pad_id)
    b = table.num_rows
    r = out["targets"].shape[1]
    t = max(int((prompt_len + response_len).max()) if b else 0, r + 1)
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    attention = np.zeros((b, t), dtype=np.int64)
    scatter_rows(prompt, prompt_len, t - response_len, input_ids)
    scatter_rows(response, response_len, np.full(b, t), input_ids)
    attention[np.arange(t)[None, :] >= (t - prompt_len - response_len)[:, None]] = 1
    position_ids = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)
    out.update(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        position_ids=torch.from_numpy(position_ids),
    )
    return out


def padding_batch(pad_id: int = 0, packed: bool = False) -> dict[str, torch.Tensor]:
    """A one-row micro-batch with an empty loss mask (in the packed layout of `learner.packing` when `packed`).

    A rank with fewer micro-batches than its peers runs these so that every rank makes the same collective
    calls (ZeRO gathers and reduces on each forward/backward); they add nothing to the loss or gradients.
    """
    batch = {
        "input_ids": torch.full((1, 2), pad_id, dtype=torch.int64),
        "position_ids": torch.tensor([[0, 1]], dtype=torch.int64),
        "targets": torch.full((1, 1), pad_id, dtype=torch.int64),
        "response_mask": torch.zeros((1, 1), dtype=torch.float32),
        "rollout_logprobs": torch.zeros((1, 1), dtype=torch.float32),
        "advantages": torch.zeros(1, dtype=torch.float32),
        "response_lengths": torch.zeros(1, dtype=torch.int64),
        "row_index": torch.full((1,), -1, dtype=torch.int64),  # no row of the shard
    }
    if packed:
        batch.update(subtree_end=torch.tensor([2, 2]), logit_index=torch.zeros((1, 1), dtype=torch.int64))
    else:
        batch["attention_mask"] = torch.ones((1, 2), dtype=torch.int64)
    return batch


def split_micro_batches(table: pa.Table, micro_batch_size: int) -> list[pa.Table]:
    """Consecutive zero-copy slices of at most `micro_batch_size` rows."""
    if micro_batch_size <= 0:
        raise ValueError("micro_batch_size must be positive")
    return [table.slice(i, micro_batch_size) for i in range(0, table.num_rows, micro_batch_size)]


def row_tokens(table: pa.Table) -> np.ndarray:
    """Prompt + response tokens of each row: the cost of its forward/backward."""
    _, p = list_column(table, "prompt_ids")
    _, r = list_column(table, "response_ids")
    return p + r


def shard_by_group(table: pa.Table, num_shards: int) -> list[np.ndarray]:
    """Row indices (in table order) of `num_shards` shards holding whole groups, balanced by tokens.

    Groups go, largest first, to the shard with the fewest tokens so far. A shard can be empty when there are
    fewer groups than shards.
    """
    if table.num_rows == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_shards)]
    group_col = table.column("group_id").combine_chunks().dictionary_encode()
    group = group_col.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n_groups = len(group_col.dictionary)
    cost = np.bincount(group, weights=row_tokens(table), minlength=n_groups)
    load = np.zeros(num_shards)
    shard_of_group = np.zeros(n_groups, dtype=np.int64)
    for g in np.argsort(-cost, kind="stable"):
        s = int(np.argmin(load))
        shard_of_group[g] = s
        load[s] += cost[g]
    shard_of_row = shard_of_group[group]
    return [np.flatnonzero(shard_of_row == s) for s in range(num_shards)]
