"""Prefix-shared packing: the trie layout by hand, and loss + every gradient equal to each row on its own.

The model is a real transformers Llama (2 layers, random weights, fp32); the reference is the padded path,
one row per batch, so no shared computation and no padding at all.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from lightning_ray.algorithms.losses import loss_denominator, policy_loss
from lightning_ray.config import AlgorithmConfig
from lightning_ray.learner import tree_attention
from lightning_ray.learner.batch import padding_batch, table_to_batch
from lightning_ray.learner.forward import forward_logprobs
from lightning_ray.learner.packing import (
    attention_inputs,
    dense_mask,
    pack_batch,
    pack_trie,
    row_sequences,
    split_by_tokens,
)
from tests.unit.test_algorithms_batch import make_table

VOCAB = 50


def tiny_llama(attention: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if attention == "tree":
        tree_attention.register()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    config._attn_implementation = attention
    return LlamaForCausalLM(config).float()


def with_advantages(table: pa.Table, seed: int = 0) -> pa.Table:
    adv = np.random.default_rng(seed).normal(size=table.num_rows).astype(np.float32)
    return table.append_column("advantage", pa.array(adv, pa.float32()))


def with_loss_mask(table: pa.Table, masks: list[list[int]]) -> pa.Table:
    return table.append_column("loss_mask", pa.array(masks, pa.list_(pa.int8())))


def loss_and_grads(model, batches, algo: AlgorithmConfig) -> tuple[float, dict[str, torch.Tensor]]:
    """The policy loss summed over micro-batches with one global denominator, and every parameter gradient."""
    model.zero_grad()
    denominator = sum(float(loss_denominator(b["response_mask"], algo.length_norm)) for b in batches)
    total = 0.0
    for b in batches:
        logp, _ = forward_logprobs(model, b)
        old = logp.detach() - 0.05 * b["response_mask"]  # a ratio off 1, so the clip is exercised too
        loss, _ = policy_loss(algo, logp, old, b["advantages"], b["response_mask"], denominator=denominator)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packed_equals_rows(table: pa.Table, max_tokens: int, attention: str = "sdpa") -> list[list[int]]:
    algo = AlgorithmConfig(length_norm="sequence")
    model = tiny_llama(attention)
    rows = split_by_tokens(row_sequences(table)[0], max_tokens)
    packed_loss, packed = loss_and_grads(model, [pack_batch(table.take(r)) for r in rows], algo)
    if attention == "tree":  # the packed trie's attention; a row alone has no trie and takes SDPA
        model.config._attn_implementation = "sdpa"
    alone_loss, alone = loss_and_grads(
        model, [table_to_batch(table.slice(i, 1)) for i in range(len(table))], algo
    )
    assert packed_loss == pytest.approx(alone_loss, abs=1e-4)
    assert packed.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-4, rtol=1e-4, msg=name)
    return rows


PROMPT = [3, 4, 5, 6, 7, 8, 9]


def group_table() -> pa.Table:
    """Two groups with shared prompts, responses of different lengths, one repeated, one a prefix of another."""
    return with_advantages(
        make_table(
            [
                ("g1", "a", PROMPT, [11, 12, 13], 1.0),
                ("g1", "b", PROMPT, [11, 14], 0.0),
                ("g1", "c", PROMPT, [15, 16, 17, 18, 19], 1.0),
                ("g1", "d", PROMPT, [11, 12, 13], 0.0),  # the same sample twice
                ("g2", "e", [3, 4, 5, 20, 21], [22], 1.0),  # shares 3 prompt tokens with g1
                ("g2", "f", [3, 4, 5, 20, 21], [22, 23, 24, 25], 0.0),  # row e is a prefix of it
            ]
        )
    )


def test_trie_layout_by_hand():
    table = make_table(
        [("g", "a", [1, 2], [3], 1.0), ("g", "b", [1, 2], [4, 5], 0.0), ("g", "c", [6], [7], 0.0)]
    )
    tokens, depths, end, nodes = pack_trie(row_sequences(table)[0])
    # pre-order: 1 2 3 | 4 5 (after the shared [1, 2]) | 6 7 (a new root)
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert depths.tolist() == [0, 1, 2, 2, 3, 0, 1]
    assert end.tolist() == [5, 5, 3, 5, 5, 7, 7]
    assert [n.tolist() for n in nodes] == [[0, 1, 2], [0, 1, 3, 4], [5, 6]]
    mask = dense_mask(torch.from_numpy(end))[0, 0].int().tolist()
    assert mask[4] == [1, 1, 0, 1, 1, 0, 0]  # token 5 sees 1 2 4 and itself, not its sibling branch 3
    assert mask[6] == [0, 0, 0, 0, 0, 1, 1]
    # chains, cut after each leaf: 1 2 3 (a root), 4 5 (below nodes 0 and 1), 6 7 (a root again)
    assert [(p.tolist(), s, e) for p, s, e in tree_attention.chains(end)] == [
        ([], 0, 3),
        ([0, 1], 3, 5),
        ([], 5, 7),
    ]
    batch = pack_batch(table)
    # row a's response [3] is predicted from node 1 (token 2); row b's [4, 5] from nodes 1 and 3
    assert batch["logit_index"].tolist() == [[0, 1], [1, 3], [0, 5]]
    assert batch["input_ids"].shape == (1, 7) and batch["targets"].tolist() == [[0, 3], [4, 5], [0, 7]]


ATTENTIONS = ["tree", "sdpa", "eager"]


def test_tree_plan_computes_fewer_pairs_than_the_dense_mask():
    """Eight answers below one prompt: each chain's queries see their ancestors and themselves, each node is the
    query of exactly one chain, and the buckets hold a fraction of the N x N pairs SDPA's mask computes."""
    prompt = list(range(1, 41))
    rows = [("g", str(i), prompt, [41 + i, *range(50, 59)], float(i % 2)) for i in range(8)]
    end = pack_batch(make_table(rows))["subtree_end"]
    plan = tree_attention.tree_plan(end)
    queries = torch.cat([b.queries.reshape(-1)[b.valid] for b in plan.buckets])
    assert sorted(queries.tolist()) == list(range(len(end)))
    assert torch.equal(queries[plan.order], torch.arange(len(end)))
    for b in plan.buckets:  # what each real query sees is exactly the rule j <= i < end[j] on the keys' nodes
        for row, (q_nodes, k_nodes) in enumerate(zip(b.queries, b.keys, strict=True)):
            for t, i in enumerate(q_nodes.tolist()):
                if row * b.queries.shape[1] + t in b.valid.tolist():
                    seen = set(k_nodes[b.mask[row, 0, t]].tolist())
                    assert seen == {j for j in range(len(end)) if j <= i < end[j]}
    pairs = sum(b.mask.shape[0] * b.mask.shape[2] * b.mask.shape[3] for b in plan.buckets)
    assert pairs < len(end) ** 2 / 2


def test_auto_attention_is_tree_on_a_cpu_flex_on_a_gpu_sdpa_unpacked(monkeypatch):
    from transformers import AttentionInterface

    from lightning_ray.config import LearnerConfig
    from lightning_ray.learner.engine import attention_implementation

    assert attention_implementation(LearnerConfig(attention="auto")) == "tree"
    assert "tree" in AttentionInterface._global_mapping  # registered for from_pretrained
    assert attention_implementation(LearnerConfig(attention="auto", packing=False)) == "sdpa"
    assert attention_implementation(LearnerConfig(attention="sdpa")) == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (
        attention_implementation(LearnerConfig(attention="auto", num_gpus_per_worker=1)) == "flex_attention"
    )


def test_tree_buckets_too_large_to_keep_their_scores_go_to_sdpa(monkeypatch):
    monkeypatch.setattr(tree_attention, "MAX_EAGER_SCORES", 0)
    assert_packed_equals_rows(group_table(), max_tokens=1000, attention="tree")


def test_the_attention_inputs_of_a_wrapped_model_are_its_inner_models():
    """A DeepSpeed engine wraps the model as `.module` and has a `config` of its own (the DeepSpeed config)."""

    class Engine(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module, self.config = module, {"train_batch_size": 1}

    end = pack_batch(group_table())["subtree_end"]
    assert set(attention_inputs(Engine(tiny_llama("tree")), end)) == {"attention_mask", "tree_plan"}
    assert attention_inputs(Engine(tiny_llama("eager")), end)["attention_mask"].dtype == torch.float32


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_shared_prompt_groups_equal_rows_alone(attention):
    table = group_table()
    rows = assert_packed_equals_rows(table, max_tokens=1000, attention=attention)
    assert len(rows) == 1
    packed = pack_batch(table)["input_ids"].shape[1]
    assert packed < sum(len(s) for s in row_sequences(table)[0]) // 2  # the prompts are computed once


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_a_group_split_across_micro_batches(attention):
    rows = assert_packed_equals_rows(group_table(), max_tokens=14, attention=attention)
    assert len(rows) > 2 and sorted(i for r in rows for i in r) == list(range(6))


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_rows_with_no_shared_prefix(attention):
    table = with_advantages(
        make_table(
            [("g", "a", [1, 2, 3], [4, 5], 1.0), ("g", "b", [6, 7], [8], 0.0), ("h", "c", [9], [10, 11], 1.0)]
        )
    )
    assert_packed_equals_rows(table, max_tokens=1000, attention=attention)
    assert pack_batch(table)["input_ids"].shape[1] == 5 + 3 + 3  # concatenated, nothing padded


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_merged_multi_turn_rows_with_loss_masks(attention):
    # a merged conversation: turn 1's answer [11, 12], a tool result [30, 31] (loss 0), turn 2's answer [13]
    table = make_table(
        [
            ("g", "a", PROMPT, [11, 12, 30, 31, 13], 1.0),
            ("g", "b", PROMPT, [11, 12, 30, 32, 14, 15], 0.0),
            ("g", "c", PROMPT, [16], 1.0),
        ]
    )
    table = with_advantages(with_loss_mask(table, [[1, 1, 0, 0, 1], [1, 1, 0, 0, 1, 1], [1]]))
    assert_packed_equals_rows(table, max_tokens=1000, attention=attention)


def test_flex_attention_block_mask_forward_only_on_cpu_equals_rows_alone():
    """The GPU path's BlockMask, forward only: FlexAttention has no backward on CPU (torch 2.13)."""
    table = group_table()
    model = tiny_llama("flex_attention")
    with torch.no_grad():
        packed, _ = forward_logprobs(model, pack_batch(table))
        for i in range(table.num_rows):
            alone, _ = forward_logprobs(model, table_to_batch(table.slice(i, 1)))
            n = alone.shape[1]
            torch.testing.assert_close(packed[i, packed.shape[1] - n :], alone[0], atol=1e-5, rtol=1e-5)


def test_budget_split_and_padding_batch():
    seqs = [np.arange(10), np.arange(10), np.arange(20, 25)]
    # sorted: [0..9], [0..9] (shares all 10, costs 0), [20..24] (costs 5): 15 tokens in one budget of 15
    assert split_by_tokens(seqs, 15) == [[0, 1, 2]]
    assert split_by_tokens(seqs, 14) == [[0, 1], [2]]
    assert split_by_tokens([np.arange(30)], 8) == [[0]]  # a row over the budget goes alone
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        split_by_tokens(seqs, 0)
    empty = padding_batch(0, packed=True)
    for attention in ATTENTIONS:
        logp, _ = forward_logprobs(tiny_llama(attention), empty)
        assert float(logp.detach().abs().sum()) == 0.0


def test_an_empty_shard_has_no_micro_batches():
    """A learner rank gets no rows when a batch has fewer groups than ranks."""
    assert split_by_tokens([], 16) == []
