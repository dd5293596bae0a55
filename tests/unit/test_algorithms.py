"""GRPO maths against numbers worked by hand (each expected value is derived in the comment above it).

Convention: group std is the *sample* std (ddof=1, as torch.std and TRL): rewards [1, 0, 0, 1] have mean 0.5
and std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.57735, so advantages are +-0.5 / 0.57735 = +-0.866025.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from lightning_ray.algorithms.advantages import compute_advantages, group_statistics
from lightning_ray.algorithms.losses import (
    kl_penalty,
    loss_denominator,
    masked_max,
    masked_mean,
    policy_loss,
    token_entropy,
    token_logprobs,
    truncate_ratio,
)
from lightning_ray.config import AlgorithmConfig
from lightning_ray.data.schema import TRANSITION_SCHEMA


def make_table(rows: list[tuple]) -> pa.Table:
    """rows: (group_id, rollout_id, reward, call_reward[, response_len]) -> a TRANSITION_SCHEMA table."""
    n = len(rows)
    resp = [r[4] if len(r) > 4 else 2 for r in rows]
    return pa.Table.from_pydict(
        {
            "rollout_id": [r[1] for r in rows],
            "task_id": [r[0] for r in rows],
            "group_id": [r[0] for r in rows],
            "attempt": [0] * n,
            "agent": ["agent"] * n,
            "call_index": list(range(n)),
            "prompt_ids": [[1, 2, 3]] * n,
            "response_ids": [[5] * k for k in resp],
            "response_logprobs": [[-1.0] * k for k in resp],
            "response_versions": [[0] * k for k in resp],
            "policy_version": [0] * n,
            "finish_reason": ["stop"] * n,
            "latency_s": [0.0] * n,
            "endpoint": ["chat"] * n,
            "model": ["m"] * n,
            "started_at": [0.0] * n,
            "response_text": [""] * n,
            "call_reward": [r[3] for r in rows],
            "reward": [r[2] for r in rows],
            "reward_dims": [[]] * n,
            "status": ["ok"] * n,
        },
        schema=TRANSITION_SCHEMA,
    )


def advantages(rows: list[tuple], **cfg) -> tuple[np.ndarray, dict, pa.Table]:
    out, metrics = compute_advantages(make_table(rows), AlgorithmConfig(**cfg))
    return out.column("advantage").to_numpy(), metrics, out


SQRT3 = math.sqrt(3.0)

# ------------------------------------------------------------------------------------------------ advantages


def test_grpo_sample_std():
    # mean 0.5, sample std 1/sqrt(3): (1 - 0.5) * sqrt(3) = 0.866025, (0 - 0.5) * sqrt(3) = -0.866025
    adv, metrics, out = advantages(
        [("g", "a", 1.0, None), ("g", "b", 0.0, None), ("g", "c", 0.0, None), ("g", "d", 1.0, None)]
    )
    np.testing.assert_allclose(adv, [0.866025, -0.866025, -0.866025, 0.866025], atol=1e-6)
    assert out.schema.field("advantage").type == pa.float32()
    assert metrics["groups"] == 1 and metrics["groups_dropped"] == 0 and metrics["rows_kept"] == 4


def test_grpo_without_std_and_dr_grpo():
    rows = [("g", "a", 1.0, None), ("g", "b", 0.0, None), ("g", "c", 0.0, None), ("g", "d", 1.0, None)]
    # norm_std off: r - mean = +-0.5
    np.testing.assert_allclose(advantages(rows, norm_std=False)[0], [0.5, -0.5, -0.5, 0.5])
    # Dr. GRPO never divides by the std, whatever norm_std says
    np.testing.assert_allclose(advantages(rows, name="dr_grpo", norm_std=True)[0], [0.5, -0.5, -0.5, 0.5])


def test_grpo_groups_are_independent():
    # group x: [2, 0] -> mean 1, sample std sqrt(2) -> +-1/sqrt(2) = +-0.707107
    # group y: [3, 1, 2] -> mean 2, sample std sqrt((1 + 1 + 0) / 2) = 1 -> [1, -1, 0]
    rows = [
        ("x", "x1", 2.0, None),
        ("y", "y1", 3.0, None),
        ("x", "x2", 0.0, None),
        ("y", "y2", 1.0, None),
        ("y", "y3", 2.0, None),
    ]
    adv, metrics, _ = advantages(rows)
    np.testing.assert_allclose(adv, [0.707107, 1.0, -0.707107, -1.0, 0.0], atol=1e-6)
    assert metrics["groups"] == 2


def test_rloo_leave_one_out():
    # rewards [1, 0, 0, 0]: baseline of a = mean(0, 0, 0) = 0 -> 1; of b = mean(1, 0, 0) = 1/3 -> -1/3
    adv, _, _ = advantages(
        [("g", "a", 1.0, None), ("g", "b", 0.0, None), ("g", "c", 0.0, None), ("g", "d", 0.0, None)],
        name="rloo",
    )
    np.testing.assert_allclose(adv, [1.0, -1 / 3, -1 / 3, -1 / 3], atol=1e-6)
    assert abs(adv.sum()) < 1e-6


def test_reinforce_pp_batch_normalisation():
    rows = [("g1", "a", 1.0, None), ("g1", "b", 0.0, None), ("g2", "c", 0.5, None), ("g2", "d", 0.5, None)]
    # drop on: g2 has zero variance and goes; batch [1, 0]: mean 0.5, sample std sqrt(0.5) -> +-0.707107
    adv, metrics, _ = advantages(rows, name="reinforce_pp", drop_zero_variance=True)
    np.testing.assert_allclose(adv, [0.707107, -0.707107], atol=1e-6)
    assert metrics["groups_dropped"] == 1
    # drop off: batch [1, 0, .5, .5]: mean 0.5, sample std sqrt(0.5 / 3) = 0.408248 -> [1.224745, -1.224745, 0, 0]
    adv, _, _ = advantages(rows, name="reinforce_pp", drop_zero_variance=False)
    np.testing.assert_allclose(adv, [1.224745, -1.224745, 0.0, 0.0], atol=1e-6)


def test_rollout_with_several_calls_counts_once():
    # rollout a made 3 calls, b made 1. Per rollout: [1, 0] -> mean 0.5, sample std sqrt(0.5) -> +-0.707107.
    # (Counting rows would give [1, 1, 1, 0]: mean 0.75 - a different, wrong baseline.)
    rows = [("g", "a", 1.0, None), ("g", "a", 1.0, None), ("g", "b", 0.0, None), ("g", "a", 1.0, None)]
    adv, metrics, _ = advantages(rows)
    np.testing.assert_allclose(adv, [0.707107, 0.707107, -0.707107, 0.707107], atol=1e-6)
    assert metrics["rollouts"] == 2


def test_per_call_reward_credit():
    # rollout a (reward 1) emitted 0.2 for its first call; its second call gets the rollout's 1.0.
    # group statistics over rollouts [1, 0]: mean 0.5, std 0.707107
    # a/call0: (0.2 - 0.5) / 0.707107 = -0.424264; a/call1: (1 - 0.5) / 0.707107 = 0.707107; b: -0.707107
    rows = [("g", "a", 1.0, 0.2), ("g", "a", 1.0, None), ("g", "b", 0.0, None)]
    adv, _, _ = advantages(rows)
    np.testing.assert_allclose(adv, [-0.424264, 0.707107, -0.707107], atol=1e-6)


def test_rollout_value_from_call_rewards_when_reward_is_null():
    # a has no final reward: its value is the sum of its call rewards 0.3 + 0.5 = 0.8; b: 0.2
    # values [0.8, 0.2]: mean 0.5, sample std sqrt(0.09 + 0.09) = 0.424264
    # a/call0: (0.3 - 0.5) / 0.424264 = -0.471405; a/call1: (0.5 - 0.5) = 0; b: -0.3 / 0.424264 = -0.707107
    rows = [("g", "a", None, 0.3), ("g", "a", None, 0.5), ("g", "b", 0.2, None)]
    adv, _, _ = advantages(rows)
    np.testing.assert_allclose(adv, [-0.471405, 0.0, -0.707107], atol=1e-6)


def test_rollout_without_any_reward_is_dropped():
    # c has neither reward nor call reward: dropped, and absent from the statistics ([1, 0] as above)
    rows = [("g", "a", 1.0, None), ("g", "c", None, None), ("g", "b", 0.0, None)]
    adv, metrics, out = advantages(rows)
    np.testing.assert_allclose(adv, [0.707107, -0.707107], atol=1e-6)
    assert out.column("rollout_id").to_pylist() == ["a", "b"]
    assert metrics["rollouts_without_reward"] == 1


def test_zero_variance_groups_dropped_or_kept():
    rows = [
        ("same", "a", 1.0, None),
        ("same", "b", 1.0, None),
        ("single", "c", 1.0, None),
        ("ok", "d", 1.0, None),
        ("ok", "e", 0.0, None),
    ]
    adv, metrics, out = advantages(rows, drop_zero_variance=True)
    assert out.column("group_id").to_pylist() == ["ok", "ok"]
    np.testing.assert_allclose(adv, [0.707107, -0.707107], atol=1e-6)
    assert metrics["groups_zero_variance"] == 2 and metrics["groups_dropped"] == 2
    # kept: no signal, advantage exactly 0 (the scale falls back to 1, never a division by ~0)
    adv, metrics, out = advantages(rows, drop_zero_variance=False)
    np.testing.assert_allclose(adv, [0.0, 0.0, 0.0, 0.707107, -0.707107], atol=1e-6)
    assert metrics["groups_dropped"] == 0 and out.num_rows == 5


def test_zero_variance_group_with_call_reward_is_not_blown_up():
    # group rewards [1, 1] (zero variance, kept): a's call reward 0.5 gives 0.5 - 1 = -0.5 with scale 1
    adv, _, _ = advantages([("g", "a", 1.0, 0.5), ("g", "b", 1.0, None)], drop_zero_variance=False)
    np.testing.assert_allclose(adv, [-0.5, 0.0])


def test_group_statistics_helper_and_chunked_input():
    stats = group_statistics(np.array([1.0, 0.0, 0.0, 1.0, 5.0]), np.array([0, 0, 0, 0, 1]), 2)
    np.testing.assert_allclose(stats["mean"], [0.5, 5.0])
    np.testing.assert_allclose(stats["std"], [1 / SQRT3, 0.0])  # single rollout: std 0 (zero variance)
    # a table made of several chunks gives the same answer as one chunk
    rows = [("g", "a", 1.0, None), ("g", "b", 0.0, None), ("g", "c", 0.0, None), ("g", "d", 1.0, None)]
    t = make_table(rows)
    chunked = pa.concat_tables([t.slice(0, 1), t.slice(1, 2), t.slice(3, 1)])
    out, _ = compute_advantages(chunked, AlgorithmConfig())
    np.testing.assert_allclose(
        out.column("advantage").to_numpy(), [0.866025, -0.866025, -0.866025, 0.866025], atol=1e-6
    )


def test_empty_table():
    out, metrics = compute_advantages(make_table([]), AlgorithmConfig())
    assert out.num_rows == 0 and metrics["groups"] == 0


# ------------------------------------------------------------------------------------------------ losses


def _ppo_inputs():
    # old log-probs 0, new log-probs log(r) -> ratios r. Sequence 0 has A = +1, sequence 1 has A = -1 and its
    # third token is padding (mask 0).
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, adv, mask


def test_ppo_clip_token_mean_asymmetric():
    logp, old, adv, mask = _ppo_inputs()
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28] (DAPO clip-higher)
    # seq 0, A = +1: max(-r, -clip(r)) = max([-.5, -1, -1.5], [-.8, -1, -1.28]) = [-0.5, -1.0, -1.28]
    # seq 1, A = -1: max(r, clip(r))   = max([.5, 1], [.8, 1])                = [0.8, 1.0]
    # token mean over 5 tokens: (-0.5 - 1 - 1.28 + 0.8 + 1) / 5 = -0.98 / 5 = -0.196
    loss, m = policy_loss(
        AlgorithmConfig(clip_low=0.2, clip_high=0.28, length_norm="token"), logp, old, adv, mask
    )
    assert loss.item() == pytest.approx(-0.196, abs=1e-6)
    # clipped tokens: (0, 2) ratio 1.5 > 1.28 with A > 0 (high side), (1, 0) ratio 0.5 < 0.8 with A < 0 (low)
    assert m["clip_frac_high"].item() == pytest.approx(0.2)
    assert m["clip_frac_low"].item() == pytest.approx(0.2)
    assert m["clip_frac"].item() == pytest.approx(0.4)
    # ratio mean over the 5 tokens: (0.5 + 1 + 1.5 + 0.5 + 1) / 5 = 0.9
    assert m["ratio"].item() == pytest.approx(0.9)
    loss.backward()
    # d loss / d logp = -A * r / 5 on unclipped tokens, 0 on clipped or masked ones:
    # seq 0: [-0.5/5, -1/5, 0] = [-0.1, -0.2, 0]; seq 1: [0, 1/5, 0] = [0, 0.2, 0]
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.1, -0.2, 0.0], [0.0, 0.2, 0.0]]))


def test_ppo_clip_length_norms():
    logp, old, adv, mask = _ppo_inputs()
    # per-token losses as above: seq 0 [-0.5, -1, -1.28] sums to -2.78, seq 1 [0.8, 1.0] sums to 1.8
    # sequence: mean(-2.78 / 3, 1.8 / 2) = (-0.926667 + 0.9) / 2 = -0.013333
    loss, _ = policy_loss(AlgorithmConfig(clip_high=0.28, length_norm="sequence"), logp, old, adv, mask)
    assert loss.item() == pytest.approx(-0.0133333, abs=1e-6)
    # constant (Dr. GRPO) with a budget of 4 tokens: (-2.78 + 1.8) / (2 sequences * 4) = -0.1225
    constant = AlgorithmConfig(clip_high=0.28, length_norm="constant")
    loss, _ = policy_loss(constant, logp, old, adv, mask, constant=4)
    assert loss.item() == pytest.approx(-0.1225, abs=1e-6)
    with pytest.raises(ValueError, match="constant"):
        policy_loss(constant, logp, old, adv, mask)
    with pytest.raises(ValueError, match="length_norm"):
        AlgorithmConfig(length_norm="nope")
    with pytest.raises(ValueError, match="length_norm"):
        loss_denominator(mask, "nope")


def test_micro_batches_with_global_denominator_sum_to_batch_loss():
    torch.manual_seed(0)
    logp, old = torch.randn(4, 5) * 0.1 - 2, torch.randn(4, 5) * 0.1 - 2
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32
    )
    for norm in ("token", "sequence", "constant"):
        algo = AlgorithmConfig(length_norm=norm)
        full, _ = policy_loss(algo, logp, old, adv, mask, constant=5)
        denom = loss_denominator(mask, norm, 5)
        parts = [
            policy_loss(algo, logp[s], old[s], adv[s], mask[s], constant=5, denominator=denom)[0]
            for s in (slice(0, 1), slice(1, 3), slice(3, 4))
        ]
        assert sum(p.item() for p in parts) == pytest.approx(full.item(), abs=1e-6), norm


def test_ratio_one_gives_policy_gradient():
    # on-policy (old == new): loss = -mean(A) over tokens = -(2 * 1 + 2 * -0.5) / 4 = -0.25, nothing clipped
    logp = torch.full((2, 2), -1.0, requires_grad=True)
    loss, m = policy_loss(AlgorithmConfig(), logp, logp.detach(), torch.tensor([1.0, -0.5]), torch.ones(2, 2))
    assert loss.item() == pytest.approx(-0.25)
    assert m["clip_frac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25], [0.125, 0.125]]))


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.1, -1.8]])
    # log pi - log ref = [0.1, -0.2]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[0.1, -0.2]]))
    # k3 = exp(-x) - 1 + x: exp(-0.1) - 0.9 = 0.0048374, exp(0.2) - 1.2 = 0.0214028
    torch.testing.assert_close(
        kl_penalty(logp, ref, "k3"), torch.tensor([[0.0048374, 0.0214028]]), atol=1e-6, rtol=0
    )
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


def test_kl_term_in_loss():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.1, -1.8]])
    # A = 0: only the KL term. token mean of 0.5 * k3 = 0.5 * (0.0048374 + 0.0214028) / 2 = 0.00656005
    algo = AlgorithmConfig(kl_coef=0.5)
    loss, m = policy_loss(algo, logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref)
    assert loss.item() == pytest.approx(0.00656005, abs=1e-7)
    assert m["kl"].item() == pytest.approx(0.0131201, abs=1e-6)
    # k1 with coefficient 1: (0.1 - 0.2) / 2 = -0.05
    algo = AlgorithmConfig(kl_coef=1.0, kl_estimator="k1")
    loss, _ = policy_loss(algo, logp, logp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logprobs=ref)
    assert loss.item() == pytest.approx(-0.05, abs=1e-6)


def test_truncated_importance_sampling():
    # one token, A = -1, ratio 3 against the rollout's log-probs, clip 0.2, cap 2
    logp = torch.tensor([[math.log(3.0)]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1)
    # untruncated: max(3 * 1, clip(3) = 1.2) = 3, gradient d(r)/d logp = r = 3
    loss, _ = policy_loss(AlgorithmConfig(), logp, old, adv, mask)  # recomputed old log-probs: no cap
    loss.backward()
    assert loss.item() == pytest.approx(3.0) and logp.grad.item() == pytest.approx(3.0)
    # truncated: value min(3, 2) = 2, gradient cap * grad log pi = 2 (still pushed down, with a bounded weight)
    logp.grad = None
    loss, m = policy_loss(AlgorithmConfig(old_logprobs="rollout", tis_cap=2.0), logp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and logp.grad.item() == pytest.approx(2.0)
    assert m["tis_frac"].item() == 1.0
    assert m["is_weight_mean"].item() == m["is_weight_max"].item() == m["is_weight_min"].item() == 2.0
    # below the cap nothing changes
    r = torch.tensor([0.5, 1.5], requires_grad=True)
    torch.testing.assert_close(truncate_ratio(r, 2.0), r)


DECOUPLED = AlgorithmConfig(old_logprobs="decoupled", clip_low=0.2, clip_high=0.28, tis_cap=2.0)


def test_decoupled_with_behaviour_equal_to_proximal_is_ppo_clip():
    # w = pi_prox / pi_behav = 1 everywhere: the loss, gradients and clip metrics of the PPO-clip test above
    logp, prox, adv, mask = _ppo_inputs()
    loss, m = policy_loss(DECOUPLED, logp, prox, adv, mask, behaviour_logprobs=prox.clone())
    assert loss.item() == pytest.approx(-0.196, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(0.4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.1, -0.2, 0.0], [0.0, 0.2, 0.0]]))
    assert m["is_weight_mean"].item() == m["is_weight_max"].item() == m["is_weight_min"].item() == 1.0
    assert m["tis_frac"].item() == 0.0
    with pytest.raises(ValueError, match="behaviour"):
        policy_loss(DECOUPLED, logp, prox, adv, mask)


def test_decoupled_weight_is_truncated_and_the_clip_is_around_the_proximal_policy():
    # A = +1 on three tokens, proximal log-probs 0. Behaviour log-probs -log 4, log 2, -log 4 give
    # w = pi_prox / pi_behav = [4 -> cap 2, 0.5, 4 -> cap 2]. New log-probs [0, 0, log 1.5]: r = [1, 1, 1.5],
    # and the third token is clipped at 1 + 0.28 = 1.28 (its behaviour policy is 6x further away; the clip
    # only sees the proximal one).
    # per token w * max(-A r, -A clip(r)) = [2 * -1, 0.5 * -1, 2 * -1.28] = [-2, -0.5, -2.56]; mean -5.06 / 3
    logp = torch.tensor([[0.0, 0.0, math.log(1.5)]], requires_grad=True)
    prox, adv, mask = torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3)
    behaviour = torch.tensor([[-math.log(4.0), math.log(2.0), -math.log(4.0)]])
    loss, m = policy_loss(DECOUPLED, logp, prox, adv, mask, behaviour_logprobs=behaviour)
    assert loss.item() == pytest.approx(-5.06 / 3, abs=1e-6)
    loss.backward()
    # d/d logp = -w * A * r / 3 where unclipped: [-2 / 3, -0.5 / 3, 0]; w itself carries no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 3, -0.5 / 3, 0.0]]))
    # weights [2, 0.5, 2]: mean 1.5, max 2, min 0.5; two of three truncated
    assert m["is_weight_mean"].item() == pytest.approx(1.5)
    assert (m["is_weight_max"].item(), m["is_weight_min"].item()) == pytest.approx((2.0, 0.5))
    assert m["tis_frac"].item() == pytest.approx(2 / 3) and m["clip_frac"].item() == pytest.approx(1 / 3)


def test_huge_log_prob_gaps_cannot_blow_up():
    # behaviour -50 (or -inf) against proximal -0.1: w = exp(49.9) ~ 5e21 is truncated to 2 in log space.
    # A = [+1, -1], r = 1: per token [-2, 2], mean 0; gradients -w A r / 2 = [-1, 1]
    logp = torch.full((2, 1), -0.1, requires_grad=True)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 1)
    for behaviour in (-50.0, -math.inf):
        logp.grad = None
        beh = torch.full((2, 1), behaviour)
        loss, m = policy_loss(DECOUPLED, logp, logp.detach(), adv, mask, behaviour_logprobs=beh)
        loss.backward()
        assert loss.item() == pytest.approx(0.0)
        torch.testing.assert_close(logp.grad, torch.tensor([[-1.0], [1.0]]))
        assert m["is_weight_max"].item() == 2.0 and m["tis_frac"].item() == 1.0
    # the same gap as a ratio (old_logprobs: rollout, log r = 199.9, past exp's float32 range): the log-ratio
    # is clamped at 20, so value and gradient stay finite (A = -1: the truncated branch, value 2)
    logp.grad = None
    loss, m = policy_loss(
        AlgorithmConfig(old_logprobs="rollout"), logp, torch.full((2, 1), -200.0), adv, mask
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    assert masked_max(torch.ones(2), torch.zeros(2)).item() == -math.inf  # the identity of max


def test_logprob_and_entropy_helpers():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])
    targets = torch.tensor([[1, 0]])
    # uniform over 4: log(1/4) = -1.386294, entropy log 4 = 1.386294
    # [2, 0, 0, 0]: log softmax[0] = 2 - log(e^2 + 3) = 2 - log(10.389056) = 2 - 2.340753 = -0.340753
    torch.testing.assert_close(token_logprobs(logits, targets), torch.tensor([[-1.386294, -0.340753]]))
    assert token_entropy(logits)[0, 0].item() == pytest.approx(math.log(4), abs=1e-6)
    torch.testing.assert_close(
        token_logprobs(logits, targets), torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    )
    assert masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0
