"""The vLLM Serve deployment on the tiny model: ids and log-probs out, versions, in-place weight updates."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from lightning_ray.inference.server import broadcast_weights

PROMPT = [1, 504, 3458, 314, 260, 2036, 30]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


def test_generate_returns_ids_logprobs_and_version(inference):
    out = inference.generate.remote(PROMPT, {"temperature": 1.0, "max_tokens": 8, "seed": 3}).result()
    assert out["prompt_ids"] == PROMPT
    assert 0 < len(out["response_ids"]) <= 8
    assert len(out["response_logprobs"]) == len(out["response_ids"])
    assert all(lp <= 0.0 for lp in out["response_logprobs"])
    assert out["finish_reason"] in ("stop", "length")
    assert out["policy_version"] == inference.policy_version.remote().result()


def test_stream_concatenates_to_the_same_completion(inference):
    whole = inference.generate.remote(PROMPT, GREEDY).result()

    async def collect():
        ids, lps, finish = [], [], None
        async for d in inference.options(stream=True).generate_stream.remote(PROMPT, GREEDY):
            ids += d["response_ids"]
            lps += d["response_logprobs"]
            finish = d["finish_reason"] or finish
        return ids, lps, finish

    ids, lps, finish = asyncio.run(collect())
    assert ids == whole["response_ids"]
    assert np.allclose(lps, whole["response_logprobs"], atol=1e-5)
    assert finish == whole["finish_reason"]


def test_prompt_longer_than_context_is_a_clear_error(inference, tiny_config):
    too_long = [1] * tiny_config.inference.max_model_len
    with pytest.raises(Exception, match="context_length_exceeded"):
        inference.generate.remote(too_long, GREEDY).result()


def test_weight_update_changes_generations_and_restores_exactly(inference, tiny_model_dir):
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    before = inference.generate.remote(PROMPT, GREEDY).result()
    checksum_before = inference.weights_checksum.remote().result()
    version = inference.policy_version.remote().result()

    torch.manual_seed(1)
    perturbed = {k: v + 0.5 * torch.randn_like(v) for k, v in original.items()}
    [result] = broadcast_weights(ray.put(perturbed), version + 1, inference)
    assert result["policy_version"] == version + 1
    assert result["tensors"] == len(original)
    changed = inference.generate.remote(PROMPT, GREEDY).result()
    assert changed["policy_version"] == version + 1
    assert changed["response_ids"] != before["response_ids"]
    assert inference.weights_checksum.remote().result() != checksum_before

    broadcast_weights(ray.put({k: v.numpy() for k, v in original.items()}), version + 2, inference)
    restored = inference.generate.remote(PROMPT, GREEDY).result()
    assert restored["response_ids"] == before["response_ids"]
    assert np.allclose(restored["response_logprobs"], before["response_logprobs"], atol=1e-6)
    assert inference.weights_checksum.remote().result() == checksum_before
    assert restored["policy_version"] == version + 2


def test_update_waits_for_in_flight_requests(inference, tiny_model_dir):
    """A request admitted before an update finishes on the old version; nothing is served half-updated."""
    weights = ray.put(load_file(str(tiny_model_dir / "model.safetensors")))
    version = inference.policy_version.remote().result()
    long_request = inference.generate.remote(PROMPT, {"temperature": 1.0, "max_tokens": 200, "seed": 0})
    update = inference.broadcast("update_weights", [weights], version + 1)
    out = long_request.result()
    [res] = update.results()
    assert out["policy_version"] == version
    assert res["policy_version"] == version + 1
    assert inference.generate.remote(PROMPT, GREEDY).result()["policy_version"] == version + 1
