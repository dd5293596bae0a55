"""DeepSpeed learners in Ray actors on the tiny model: steps, log-probs, weights, checkpoints and resume.

Real DeepSpeed with gloo on CPU. Each group costs ~5-10 s to start on a 2-core box, so groups are shared per
module where a test does not need a fresh one. Run under the shared lock:
    flock /tmp/lr-heavy.lock python -m pytest tests/integration/test_learner.py -x -q
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open

from lightning_ray.algorithms.advantages import compute_advantages
from lightning_ray.config import AlgorithmConfig, LearnerConfig, LoraConfig
from lightning_ray.data.schema import TRANSITION_SCHEMA
from lightning_ray.learner.batch import table_to_batch
from lightning_ray.learner.checkpoint import CHECKPOINT_MARKER
from lightning_ray.learner.forward import forward_logprobs
from lightning_ray.learner.group import LearnerGroup
from lightning_ray.learner.packing import row_sequences

FLOAT_TOL = 1e-5  # fp32 learner vs fp32 transformers forward of the same weights


def make_table(
    num_groups: int = 2, group_size: int = 4, seed: int = 0, calls: int = 1, shared_prompt: bool = False
) -> pa.Table:
    """GRPO groups of random token sequences with rewards alternating 1, 0 (so no group has zero variance);
    with `shared_prompt`, the rows of a group share one prompt, as a GRPO group's samples do."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {f.name: [] for f in TRANSITION_SCHEMA}
    for g in range(num_groups):
        prompt = rng.integers(100, 5000, int(rng.integers(10, 30))).tolist() if shared_prompt else None
        for k in range(group_size):
            for c in range(calls):
                p, r = int(rng.integers(4, 12)), int(rng.integers(3, 9))
                cols["rollout_id"].append(f"g{g}r{k}")
                cols["task_id"].append(f"t{g}")
                cols["group_id"].append(f"g{g}")
                cols["attempt"].append(0)
                cols["agent"].append("agent")
                cols["call_index"].append(c)
                cols["prompt_ids"].append(prompt or rng.integers(100, 5000, p).tolist())
                cols["response_ids"].append(rng.integers(100, 5000, r).tolist())
                cols["response_logprobs"].append([-10.0] * r)
                cols["response_versions"].append([0] * r)
                cols["policy_version"].append(0)
                cols["finish_reason"].append("stop")
                cols["latency_s"].append(0.0)
                cols["endpoint"].append("chat")
                cols["model"].append("tiny")
                cols["started_at"].append(0.0)
                cols["response_text"].append("")
                cols["call_reward"].append(None)
                cols["reward"].append(float(k % 2))
                cols["reward_dims"].append([])
                cols["status"].append("ok")
    return pa.Table.from_pydict(cols, schema=TRANSITION_SCHEMA)


def with_logprobs(table: pa.Table, logprobs: list[np.ndarray]) -> pa.Table:
    """The table with `response_logprobs` replaced (as if the engine had reported these)."""
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in logprobs])]).astype(np.int32)
    values = np.concatenate(logprobs).astype(np.float32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return table.set_column(table.column_names.index("response_logprobs"), "response_logprobs", column)


def hf_logprobs(model: torch.nn.Module, table: pa.Table) -> list[np.ndarray]:
    """Reference log-probs from a plain transformers model, one unpadded row at a time."""
    out = []
    with torch.no_grad():
        for i in range(table.num_rows):
            row = table.slice(i, 1)
            prompt = row.column("prompt_ids")[0].values.to_numpy()
            response = row.column("response_ids")[0].values.to_numpy()
            ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            out.append(logp[pos, torch.from_numpy(response.astype(np.int64))].numpy())
    return out


def surrogate(table: pa.Table, logprobs: list[np.ndarray]) -> float:
    """sum over rows of advantage * sum of response log-probs: what a policy-gradient step increases."""
    adv = table.column("advantage").to_numpy()
    return float(sum(a * lp.sum() for a, lp in zip(adv, logprobs, strict=True)))


def learner_cfg(**kw) -> LearnerConfig:
    base = {"num_workers": 2, "num_cpus_per_worker": 0.5, "zero_stage": 2, "micro_batch_size": 2, "lr": 1e-3}
    return LearnerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def batch() -> pa.Table:
    table, _ = compute_advantages(make_table(), AlgorithmConfig())
    return table


@pytest.fixture(scope="module")
def zero2(ray_cluster, tiny_model_dir):
    group = LearnerGroup(learner_cfg(), tiny_model_dir)
    yield group
    group.shutdown()


def test_padded_forward_matches_unpadded(tiny_model_dir, batch):
    """The left-padded micro-batch layout gives each row exactly its unpadded log-probs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        logp, entropy = forward_logprobs(model, table_to_batch(batch), with_entropy=True)
    ref = hf_logprobs(model, batch)
    lengths = [len(x) for x in ref]
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logp[i, logp.shape[1] - n :].numpy(), ref[i], atol=FLOAT_TOL)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()


def test_state_dict_ref_has_every_hf_name_and_the_learner_weights(zero2, tiny_model_dir, batch, ray_cluster):
    """The broadcast state dict is keyed exactly like the model's safetensors file (tied lm_head omitted)."""
    from transformers import AutoModelForCausalLM

    state = ray_cluster.get(zero2.state_dict_ref())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    assert set(state) == file_keys
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state  # tied to embed_tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert set(state) == {k for k in model.state_dict() if k != "lm_head.weight"}
    for name, tensor in model.state_dict().items():
        if name in state:
            assert state[name].shape == tensor.shape and state[name].dtype == torch.float32
    # loading it (re-tying lm_head) reproduces the learner's log-probs
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    ref = hf_logprobs(model, batch)
    got = zero2.compute_logprobs(batch)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=FLOAT_TOL)


def test_two_workers_zero2_loss_decreases_on_repeated_batch(zero2, batch):
    """Old log-probs fixed (taken from the "rollout"): the PPO surrogate loss must go down step after step."""
    table = with_logprobs(batch, zero2.compute_logprobs(batch))
    algo = AlgorithmConfig(old_logprobs="rollout")
    metrics = [zero2.train_step(table, algo) for _ in range(4)]
    losses = [m["loss"] for m in metrics]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    m = metrics[-1]
    total_tokens = sum(len(x) for x in table.column("response_ids").to_numpy(zero_copy_only=False))
    assert m["tokens"] == total_tokens and m["sequences"] == table.num_rows
    assert m["optimizer_steps"] == 1 and m["micro_batches"] == 1  # 4 rows per rank, packed in one micro-batch
    assert m["tokens_computed"] == sum(
        len(s) for s in row_sequences(table)[0]
    )  # no prefix shared, no padding
    assert 0 < m["grad_norm"] < 100 and np.isfinite(m["entropy"]) and 0 <= m["clip_frac"] <= 1


def test_recompute_step_improves_the_surrogate(zero2, batch):
    before = zero2.compute_logprobs(batch)
    m = zero2.train_step(batch, AlgorithmConfig(old_logprobs="recompute"))
    after = zero2.compute_logprobs(batch)
    assert surrogate(batch, after) > surrogate(batch, before)
    assert (
        m["ratio"] == pytest.approx(1.0, abs=1e-6) and m["clip_frac"] == 0.0
    )  # one optimizer step: on-policy
    # the table's rollout log-probs are a constant -10: the learner/engine mismatch metric sees that
    assert m["logprob_diff_rollout"] > 0


def test_decoupled_step_weights_tokens_by_the_truncated_behaviour_ratio(zero2, batch):
    """Behaviour log-probs = proximal - log w_row: the step reports exactly those weights, truncated at the
    cap, with the extremes taken over both ranks (group g0, rank one, holds the smallest; g1 the largest)."""
    proximal = zero2.compute_logprobs(batch)
    w = np.array([0.25, 0.5, 1.0, 1.5, 0.75, 1.25, 3.0, 4.0])  # per row; rows 0-3 are g0, 4-7 g1
    table = with_logprobs(batch, [lp - np.log(x) for lp, x in zip(proximal, w, strict=True)])
    m = zero2.train_step(table, AlgorithmConfig(old_logprobs="decoupled", tis_cap=2.0))
    tokens = np.array([len(lp) for lp in proximal])
    assert np.isfinite(m["loss"]) and m["ratio"] == pytest.approx(1.0, abs=1e-6)  # one step: r = 1
    assert m["is_weight_mean"] == pytest.approx((np.minimum(w, 2.0) * tokens).sum() / tokens.sum(), rel=1e-4)
    assert (m["is_weight_min"], m["is_weight_max"]) == pytest.approx((0.25, 2.0), rel=1e-4)
    assert m["tis_frac"] == pytest.approx(tokens[w > 2].sum() / tokens.sum())
    assert m["logprob_diff_rollout"] == pytest.approx(
        (np.abs(np.log(w)) * tokens).sum() / tokens.sum(), rel=1e-3
    )


def test_kl_to_reference(zero2, batch):
    zero2.train_step(batch, AlgorithmConfig())  # move away from the initial (reference) weights
    m = zero2.train_step(batch, AlgorithmConfig(kl_coef=0.1, kl_estimator="k3"))
    assert m["kl"] > 0


def test_one_and_two_workers_take_the_same_step(ray_cluster, tiny_model_dir, batch):
    """Loss normalisation across ranks and micro-batches: 1 x 8 rows == 2 x 4 rows (loss, grad norm, weights)."""
    algo = AlgorithmConfig()
    results = {}
    for n in (1, 2):
        group = LearnerGroup(
            learner_cfg(num_workers=n, zero_stage=0, max_tokens_per_micro_batch=40, lr=1e-2), tiny_model_dir
        )
        try:
            metrics = group.train_step(batch, algo)
            results[n] = (metrics, ray_cluster.get(group.state_dict_ref()))
        finally:
            group.shutdown()
    (m1, s1), (m2, s2) = results[1], results[2]
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    for name in s1:
        torch.testing.assert_close(s1[name], s2[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["zero3_two_ranks", "lora"])
def test_packed_and_padded_learners_take_the_same_step(ray_cluster, tiny_model_dir, variant):
    """Prefix-shared packing (each group's prompt computed once, micro-batches cut by tokens) vs left-padded
    rows: the same loss, grad norm and weights (fp32), with the KL reference forward on too."""
    if variant == "lora":
        pytest.importorskip("peft")
    table, _ = compute_advantages(make_table(shared_prompt=True), AlgorithmConfig())
    kw = (
        {"num_workers": 2, "zero_stage": 3, "lr": 1e-2}
        if variant == "zero3_two_ranks"
        else {"num_workers": 1, "zero_stage": 0, "lr": 5e-2, "lora": LoraConfig(rank=4, alpha=8.0)}
    )
    results = {}
    for packing in (True, False):
        cfg = learner_cfg(packing=packing, max_tokens_per_micro_batch=48, micro_batch_size=3, **kw)
        group = LearnerGroup(cfg, tiny_model_dir)
        try:
            metrics = group.train_step(table, AlgorithmConfig(kl_coef=0.1))
            results[packing] = (metrics, ray_cluster.get(group.state_dict_ref()))
        finally:
            group.shutdown()
    (packed, s_packed), (padded, s_padded) = results[True], results[False]
    assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-6)
    assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    assert packed["tokens"] == padded["tokens"] and packed["micro_batches"] >= 2
    assert packed["tokens_computed"] < 0.6 * padded["tokens_computed"]  # prompts once, no padding
    for name in s_padded:
        torch.testing.assert_close(s_packed[name], s_padded[name], atol=1e-5, rtol=1e-4)


def test_minibatches_make_later_steps_off_policy(ray_cluster, tiny_model_dir, batch):
    """gradient_accumulation_steps=1 with 2 micro-batches per rank: two optimizer steps, the second one sees
    ratios != 1 and, with a tiny clip range, clipping, for recomputed and decoupled old log-probs. (Also
    covers ZeRO-0 in bf16.)"""
    group = LearnerGroup(
        learner_cfg(
            num_workers=1,
            zero_stage=0,
            precision="bfloat16",
            gradient_accumulation_steps=1,
            max_tokens_per_micro_batch=64,
            lr=1e-2,
        ),
        tiny_model_dir,
    )
    try:
        m = group.train_step(batch, AlgorithmConfig(clip_low=1e-4, clip_high=1e-4))
        # decoupled: the proximal log-probs come from the pass before the first update, so again clipping
        decoupled = group.train_step(
            batch, AlgorithmConfig(old_logprobs="decoupled", clip_low=1e-4, clip_high=1e-4)
        )
    finally:
        group.shutdown()
    for step in (m, decoupled):
        assert step["optimizer_steps"] >= 2
        assert step["clip_frac"] > 0 and np.isfinite(step["grad_norm"]) and np.isfinite(step["loss"])
    assert 0 < decoupled["is_weight_min"] <= decoupled["is_weight_mean"] <= decoupled["is_weight_max"] <= 2.0


def test_checkpoint_loads_in_transformers_and_resumes_exactly(
    zero2, ray_cluster, tiny_model_dir, batch, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    algo = AlgorithmConfig()
    zero2.train_step(batch, algo)
    ckpt = zero2.save_checkpoint(tmp_path / "ckpt", extra={"step": 7})
    saved_logprobs = zero2.compute_logprobs(batch)
    next_metrics = zero2.train_step(batch, algo)
    next_logprobs = zero2.compute_logprobs(batch)

    # HF folder: transformers loads it as is and computes the same log-probs as the learner did at save time
    assert (ckpt / CHECKPOINT_MARKER).is_file() and (ckpt / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for a, b in zip(hf_logprobs(model, batch), saved_logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=FLOAT_TOL)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert tokenizer.chat_template and len(tokenizer) == model.config.vocab_size
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]

    # a fresh group resumes weights + Adam state: the next step is identical
    resumed = LearnerGroup(learner_cfg(), tiny_model_dir)
    try:
        marker = resumed.load_checkpoint(ckpt)
        assert marker["extra"] == {"step": 7}
        for a, b in zip(resumed.compute_logprobs(batch), saved_logprobs, strict=True):
            np.testing.assert_array_equal(a, b)
        again = resumed.train_step(batch, algo)
        for key in ("loss", "grad_norm", "entropy", "pg_loss"):
            assert again[key] == pytest.approx(next_metrics[key], abs=1e-7), key
        for a, b in zip(resumed.compute_logprobs(batch), next_logprobs, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    finally:
        resumed.shutdown()


def test_zero3_bf16_step_state_dict_and_resume(ray_cluster, tiny_model_dir, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = learner_cfg(zero_stage=3, precision="bfloat16")
    group = LearnerGroup(cfg, tiny_model_dir)
    try:
        m = group.train_step(batch, AlgorithmConfig(old_logprobs="rollout"))
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
        state = ray_cluster.get(group.state_dict_ref())  # gathered from the ZeRO-3 partitions
        with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
            assert set(state) == set(f.keys())
            embed = f.get_tensor("model.embed_tokens.weight")
        assert all(t.dtype == torch.bfloat16 for t in state.values())
        assert state["model.embed_tokens.weight"].shape == embed.shape
        group.save_checkpoint(tmp_path / "z3")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "z3")
        assert model.dtype == torch.bfloat16
        torch.testing.assert_close(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
        saved = group.compute_logprobs(batch)
        nxt = group.train_step(batch, AlgorithmConfig(old_logprobs="rollout"))
    finally:
        group.shutdown()
    resumed = LearnerGroup(cfg, tiny_model_dir)
    try:
        resumed.load_checkpoint(tmp_path / "z3")
        for a, b in zip(resumed.compute_logprobs(batch), saved, strict=True):
            np.testing.assert_array_equal(a, b)
        again = resumed.train_step(batch, AlgorithmConfig(old_logprobs="rollout"))
        assert again["loss"] == pytest.approx(nxt["loss"], abs=1e-6)
    finally:
        resumed.shutdown()


def test_lora_trains_adapters_and_exports_merged_hf_weights(ray_cluster, tiny_model_dir, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("peft")
    cfg = learner_cfg(num_workers=1, zero_stage=0, lr=5e-2, lora=LoraConfig(rank=4, alpha=8.0))
    group = LearnerGroup(cfg, tiny_model_dir)
    try:
        full = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
        assert 0 < group.trainable_params < full / 10
        before = ray_cluster.get(group.state_dict_ref())
        group.train_step(batch, AlgorithmConfig())
        group.train_step(batch, AlgorithmConfig())
        after = ray_cluster.get(group.state_dict_ref())
        group.save_checkpoint(tmp_path / "lora")
        learner_logprobs = group.compute_logprobs(batch)
    finally:
        group.shutdown()
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        assert set(after) == set(f.keys())  # plain HF names, no lora_A / lora_B / base_layer
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])  # the adapter was merged into the exported weight
    torch.testing.assert_close(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora", dtype=torch.float32)
    for a, b in zip(hf_logprobs(model, batch), learner_logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=FLOAT_TOL)
