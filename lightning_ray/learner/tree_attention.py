"""Attention over a packed trie on the CPU: each token attends to its ancestors only, computed path by path.

The packed micro-batch (`learner.packing`) lays its trie out in pre-order, where token i may attend to token j
iff j <= i < end[j]. With the dense N x N mask of that rule SDPA computes every pair of the micro-batch, and on
the CPU its bfloat16 kernel took about half of a SmolLM2 learner step: for 1,480 tokens of 3 GRPO groups, whose
rows attend to their prompt and their own answer, 16% of the pairs are allowed. This implementation
(`learner.attention: tree`, the CPU default with packing) computes those and some padding (29% of the pairs
there). One DeepSpeed rank, bfloat16, one thread, on the quickstart's batches: 9.3 s instead of 15.1 for that
step, 1.43x over batches of three sizes (`benchmarks/learner_throughput.py --threads 1`); with two threads
1.0-1.3x; in float32 even.

In pre-order the trie splits into chains: runs of tokens each the child of the one before, cut after every
leaf. A chain is the fresh part of one row, its tokens see the chain's ancestors (the nodes j before it with
end[j] past its start) and the chain up to themselves: an SDPA-shaped problem with T queries, p + T keys and a
causal rule shifted by p. Chains of similar shape are stacked into a few buckets (padded pairs at most
`SLACK` times the real ones), whose keys and values are gathered per chain (`index_select`, whose backward
sums a shared prefix's gradients over its rows), and whose outputs, one per token, are put back in node order.

The arithmetic per chain is transformers' eager attention (scores in the model's dtype, softmax in float32),
grouped-query heads share their key head without copies; a bucket too large to keep its scores for the backward
goes to SDPA with its mask instead (`MAX_EAGER_SCORES`). The plan is built on the host from `subtree_end`
and reaches the attention through the model's keyword arguments (`tree_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NAME = "tree"
SLACK = 1.5  # a bucket's padded query-key pairs at most this many times its real ones
# Above this many scores (buckets x heads x queries x keys) a bucket goes to SDPA's flash kernel, which never
# holds the scores: the eager arithmetic keeps them for the backward. One 4,096-token row of SmolLM2 in bfloat16,
# forward and backward: 5.1 GB peak with this limit; all eager, killed for memory at 24 GB. 16M: a chain of up
# to ~1,360 tokens of SmolLM2 (9 heads) stays eager.
MAX_EAGER_SCORES = 1 << 24


@dataclass
class Bucket:
    queries: torch.Tensor  # [B, T] node of each query (0 where padding)
    keys: torch.Tensor  # [B, L] node of each key: the chain's ancestors, then the chain (0 where padding)
    mask: torch.Tensor  # [B, 1, T, L] query t of chain b sees key l
    valid: torch.Tensor  # flat indices into B * T of the real queries


@dataclass
class TreePlan:
    buckets: list[Bucket]
    order: torch.Tensor  # [N] row of the stacked bucket outputs that holds node n


def chains(subtree_end: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """(ancestor nodes, start, end) of each chain of the pre-order trie with subtree ends `subtree_end`."""
    n = len(subtree_end)
    leaves = np.flatnonzero(subtree_end == np.arange(1, n + 1))
    starts = np.concatenate([[0], leaves[:-1] + 1])
    return [
        (np.flatnonzero(subtree_end[:s] > s), int(s), int(e)) for s, e in zip(starts, leaves + 1, strict=True)
    ]


def _shape(group: list[tuple[np.ndarray, int, int]]) -> tuple[int, int]:
    """(queries, keys) of a bucket of chains: its longest chain and its longest ancestor path."""
    return max(e - s for _, s, e in group), max(len(p) + e - s for p, s, e in group)


def _pairs(group: list[tuple[np.ndarray, int, int]]) -> tuple[int, int]:
    """(padded, real) query-key pairs of a bucket of chains."""
    t, keys = _shape(group)
    return len(group) * t * keys, sum((e - s) * (len(p) + e - s) for p, s, e in group)


def _bucket(group: list[tuple[np.ndarray, int, int]], device: torch.device) -> tuple[Bucket, np.ndarray]:
    t_max, l_max = _shape(group)
    queries = np.zeros((len(group), t_max), np.int64)
    keys = np.zeros((len(group), l_max), np.int64)
    mask = np.zeros((len(group), 1, t_max, l_max), bool)
    valid = np.zeros((len(group), t_max), bool)
    for i, (prefix, s, e) in enumerate(group):
        t, p = e - s, len(prefix)
        queries[i, :t] = np.arange(s, e)
        keys[i, : p + t] = np.concatenate([prefix, queries[i, :t]])
        mask[i, 0, :t] = np.arange(l_max)[None, :] <= p + np.arange(t)[:, None]
        mask[i, 0, t:, 0] = True  # a padding query sees one key, so its (discarded) softmax is finite
        valid[i, :t] = True
    bucket = Bucket(*(torch.from_numpy(a).to(device) for a in (queries, keys, mask, np.flatnonzero(valid))))
    return bucket, queries[valid]


def tree_plan(subtree_end: torch.Tensor) -> TreePlan:
    """The buckets of chains of one packed micro-batch (longest chains first, greedily while within SLACK), on
    the device of `subtree_end`."""
    groups: list[list[tuple[np.ndarray, int, int]]] = []
    for chain in sorted(chains(subtree_end.cpu().numpy()), key=lambda c: c[1] - c[2]):
        if groups:
            padded, real = _pairs(groups[-1] + [chain])
            if padded <= SLACK * real:
                groups[-1].append(chain)
                continue
        groups.append([chain])
    buckets, nodes = zip(*(_bucket(g, subtree_end.device) for g in groups), strict=True)
    order = torch.from_numpy(np.argsort(np.concatenate(nodes))).to(subtree_end.device)
    return TreePlan(list(buckets), order)


def tree_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    tree_plan: TreePlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: `query` [1, H, N, D], `key`/`value` [1, Hkv, N, D] of the packed nodes
    -> [1, N, H, D]. Dropout is not supported (the learner trains with the model's dropout at 0)."""
    if tree_plan is None:
        raise ValueError("learner.attention=tree needs the micro-batch's tree_plan (packed batches only)")
    if dropout:
        raise ValueError("learner.attention=tree does not implement attention dropout")
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    scale = scaling if scaling is not None else dim**-0.5
    outputs = []
    for b in tree_plan.buckets:
        n, t = b.queries.shape
        length = b.keys.shape[1]
        q = query[0].index_select(1, b.queries.reshape(-1)).view(heads, n, t, dim).transpose(0, 1)
        k = key[0].index_select(1, b.keys.reshape(-1)).view(kv_heads, n, length, dim).transpose(0, 1)
        v = value[0].index_select(1, b.keys.reshape(-1)).view(kv_heads, n, length, dim).transpose(0, 1)
        if n * heads * t * length > MAX_EAGER_SCORES:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask, scale=scale, enable_gqa=True)
        else:
            out = _eager(q, k, v, b.mask, scale)
        outputs.append(out.transpose(1, 2).reshape(n * t, heads, dim).index_select(0, b.valid))
    return torch.cat(outputs).index_select(0, tree_plan.order)[None], None


def _eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """transformers' eager arithmetic for q [B, H, T, D], k/v [B, Hkv, L, D], mask [B, 1, T, L] -> [B, H, T, D].
    The query heads g * G .. (g + 1) * G - 1 that share key head g are stacked along T, so keys are not copied."""
    n, heads, t, dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(n, kv_heads, group * t, dim), k.transpose(-1, -2)) * scale
    scores = scores.view(n, kv_heads, group, t, length).masked_fill(~mask[:, :, None], float("-inf"))
    weights = torch.softmax(scores.view(n, kv_heads, group * t, length), dim=-1, dtype=torch.float32)
    return torch.matmul(weights.to(q.dtype), v).view(n, heads, t, dim)


def register() -> None:
    """Make `attn_implementation="tree"` known to transformers (idempotent). Its mask function returns None:
    the plan, not a mask, carries the structure."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, tree_attention)
    AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)
