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
from lightning_ray.learner.batch import padding_batch, table_to_batch
from lightning_ray.learner.forward import forward_logprobs
from lightning_ray.learner.packing import dense_mask, pack_batch, pack_trie, row_sequences, split_by_tokens
from tests.unit.test_algorithms_batch import make_table

VOCAB = 50


def tiny_llama(attention: str = "sdpa") -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

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
    batch = pack_batch(table)
    # row a's response [3] is predicted from node 1 (token 2); row b's [4, 5] from nodes 1 and 3
    assert batch["logit_index"].tolist() == [[0, 1], [1, 3], [0, 5]]
    assert batch["input_ids"].shape == (1, 7) and batch["targets"].tolist() == [[0, 3], [4, 5], [0, 7]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_groups_equal_rows_alone(attention):
    table = group_table()
    rows = assert_packed_equals_rows(table, max_tokens=1000, attention=attention)
    assert len(rows) == 1
    packed = pack_batch(table)["input_ids"].shape[1]
    assert packed < sum(len(s) for s in row_sequences(table)[0]) // 2  # the prompts are computed once


def test_a_group_split_across_micro_batches():
    rows = assert_packed_equals_rows(group_table(), max_tokens=14)
    assert len(rows) > 2 and sorted(i for r in rows for i in r) == list(range(6))


def test_rows_with_no_shared_prefix():
    table = with_advantages(
        make_table(
            [("g", "a", [1, 2, 3], [4, 5], 1.0), ("g", "b", [6, 7], [8], 0.0), ("h", "c", [9], [10, 11], 1.0)]
        )
    )
    assert_packed_equals_rows(table, max_tokens=1000)
    assert pack_batch(table)["input_ids"].shape[1] == 5 + 3 + 3  # concatenated, nothing padded


def test_merged_multi_turn_rows_with_loss_masks():
    # a merged conversation: turn 1's answer [11, 12], a tool result [30, 31] (loss 0), turn 2's answer [13]
    table = make_table(
        [
            ("g", "a", PROMPT, [11, 12, 30, 31, 13], 1.0),
            ("g", "b", PROMPT, [11, 12, 30, 32, 14, 15], 0.0),
            ("g", "c", PROMPT, [16], 1.0),
        ]
    )
    table = with_advantages(with_loss_mask(table, [[1, 1, 0, 0, 1], [1, 1, 0, 0, 1, 1], [1]]))
    assert_packed_equals_rows(table, max_tokens=1000)


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
    logp, _ = forward_logprobs(tiny_llama(), empty)
    assert float(logp.abs().sum()) == 0.0


def test_an_empty_shard_has_no_micro_batches():
    """A learner rank gets no rows when a batch has fewer groups than ranks."""
    assert split_by_tokens([], 16) == []
