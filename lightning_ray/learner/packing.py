"""Prefix-shared packing: a micro-batch as one sequence in which every token shared by several rows appears once.

The G samples of a GRPO group repeat one prompt (system rules, demos, tool schemas, the question), and merged
multi-turn rows repeat their earlier turns. Left-padded rows compute that prefix G times, plus the padding;
packed, a group of G rows with a P-token prompt and R-token answers costs P + G·R token passes instead of
G·(P+R). The idea is Prefix Grouper's (arXiv 2506.05433) generalised to a trie over whole sequences.

Layout. The rows of a micro-batch are inserted into a token trie (a node per distinct prefix) and the nodes
are laid out in depth-first pre-order, so node `j`'s subtree is the contiguous range `[j, end[j])`. Node `i`
may attend to node `j` iff `j` is an ancestor of `i` or `i` itself, that is iff `j <= i < end[j]`: one
comparison, which is a FlexAttention `mask_mod` (`block_mask`, on GPU), the chains the CPU computes one by
one (`tree_attention`), and the dense mask of SDPA and eager (`dense_mask`). A node's position id is its
depth, so each row sees exactly the positions and context it has on its own, and its logits, loss and
gradients equal the unpacked row's: shared nodes receive the sum of their rows' gradients, as the padded
batch sums them.

The trie of rows in lexicographic order is cheap to build without one: row k's new nodes are its tokens
after its longest common prefix with row k-1 (the sorted neighbour shares the most with it), and emitting
them in that order is a pre-order walk. Rows are sorted over the whole shard first, so rows with the same
prompt pack together whatever group they came from, and micro-batches are cut by computed tokens
(`max_tokens`), not rows: no padding is ever computed. A row longer than the budget is a micro-batch alone.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from lightning_ray.data.schema import list_column
from lightning_ray.learner import tree_attention
from lightning_ray.learner.batch import response_tensors


def row_sequences(table: pa.Table) -> tuple[list[np.ndarray], np.ndarray]:
    """Each row's prompt + response token ids, and its prompt length."""
    prompt, prompt_len = list_column(table, "prompt_ids")
    response, response_len = list_column(table, "response_ids")
    if (prompt_len == 0).any():
        raise ValueError("a row has an empty prompt: its first response token has no position to predict it")
    p_off = np.concatenate([[0], np.cumsum(prompt_len)])
    r_off = np.concatenate([[0], np.cumsum(response_len)])
    seqs = [
        np.concatenate([prompt[p_off[i] : p_off[i + 1]], response[r_off[i] : r_off[i + 1]]]).astype(np.int64)
        for i in range(table.num_rows)
    ]
    return seqs, prompt_len


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def sorted_rows(seqs: list[np.ndarray]) -> tuple[list[int], list[int]]:
    """Rows in lexicographic token order, and each one's common prefix with the row before it (0 for the first)."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].tolist())
    shared = [0] * bool(order) + [
        common_prefix(seqs[a], seqs[b]) for a, b in zip(order, order[1:], strict=False)
    ]
    return order, shared


def split_by_tokens(seqs: list[np.ndarray], max_tokens: int) -> list[list[int]]:
    """Rows (indices into `seqs`) of each micro-batch: sorted rows cut where the packed tokens would pass
    `max_tokens`. The first row of a micro-batch costs its whole length, every later one its unshared tail."""
    if max_tokens <= 0:
        raise ValueError("learner.max_tokens_per_micro_batch must be positive")
    order, shared = sorted_rows(seqs)
    batches: list[list[int]] = []
    used = 0
    for row, common in zip(order, shared, strict=True):
        cost = len(seqs[row]) - common
        if batches and used + cost <= max_tokens:
            batches[-1].append(row)
            used += cost
        else:
            batches.append([row])
            used = len(seqs[row])
    return batches


def pack_trie(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """(token ids, position ids, subtree ends) of the packed nodes in pre-order, and each row's node indices
    (row i's token t is node `nodes[i][t]`)."""
    order, shared = sorted_rows(seqs)
    tokens: list[np.ndarray] = []
    depths: list[np.ndarray] = []
    nodes: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(seqs)
    count, prev = 0, np.zeros(0, dtype=np.int64)
    for row, common in zip(order, shared, strict=True):
        seq = seqs[row]
        fresh = np.arange(count, count + len(seq) - common, dtype=np.int64)
        nodes[row] = prev = np.concatenate([prev[:common], fresh])
        tokens.append(seq[common:])
        depths.append(np.arange(common, len(seq), dtype=np.int64))
        count += len(fresh)
    end = np.arange(1, count + 1, dtype=np.int64)  # a leaf's subtree is itself
    for path in nodes:  # every node on a row's path contains that row's last node
        if len(path):
            np.maximum.at(end, path, path[-1] + 1)
    return np.concatenate(tokens), np.concatenate(depths), end, nodes


def pack_batch(table: pa.Table, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One packed micro-batch: the response tensors of `table_to_batch` ([B, R], right-aligned) plus

    `input_ids`, `position_ids` [1, N] (the N packed nodes), `subtree_end` [N] (the attention rule above) and
    `logit_index` [B, R]: the node whose logits predict each response token (0 where the mask is 0).
    """
    seqs, prompt_len = row_sequences(table)
    out = response_tensors(table, pad_id)
    tokens, depths, end, nodes = pack_trie(seqs)
    lengths = out["response_lengths"].numpy()
    r = out["targets"].shape[1]
    logit_index = np.zeros((len(seqs), r), dtype=np.int64)
    for i, (path, p, n) in enumerate(zip(nodes, prompt_len, lengths, strict=True)):
        logit_index[i, r - n :] = path[p - 1 : p - 1 + n]  # token t is predicted from the node of token t - 1
    out.update(
        input_ids=torch.from_numpy(tokens)[None, :],
        position_ids=torch.from_numpy(depths)[None, :],
        subtree_end=torch.from_numpy(end),
        logit_index=torch.from_numpy(logit_index),
    )
    return out


def dense_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """[1, 1, N, N] boolean attention mask (True = attend): query i sees key j iff j <= i < end[j]."""
    idx = torch.arange(len(subtree_end), device=subtree_end.device)
    return ((idx[None, :] <= idx[:, None]) & (idx[:, None] < subtree_end[None, :]))[None, None]


def block_mask(subtree_end: torch.Tensor):
    """The same rule as a FlexAttention `BlockMask` (no N x N tensor): the GPU path."""
    from torch.nn.attention.flex_attention import create_block_mask

    def ancestor_or_self(b, h, q, kv):
        return (kv <= q) & (q < subtree_end[kv])

    n = len(subtree_end)
    return create_block_mask(ancestor_or_self, None, None, n, n, device=subtree_end.device)


def attention_inputs(model: torch.nn.Module, subtree_end: torch.Tensor) -> dict:
    """What the model's attention implementation takes for the trie rule: the chains' plan for `tree` (no mask),
    a BlockMask for flex_attention, an additive float mask for eager (which adds the mask to the scores as is),
    the boolean mask for SDPA."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine's own `config` is its DeepSpeed config
    implementation = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if implementation == tree_attention.NAME:
        return {"attention_mask": None, "tree_plan": tree_attention.tree_plan(subtree_end)}
    if implementation == "flex_attention":
        return {"attention_mask": block_mask(subtree_end)}
    mask = dense_mask(subtree_end)
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return {"attention_mask": mask}
