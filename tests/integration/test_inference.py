"""The vLLM Serve deployment on the tiny model: ids and log-probs out, versions, in-place weight updates."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

from lightning_ray.inference.server import InferenceServer
from lightning_ray.weights.object_store import push_state

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
    [result] = push_state(inference, ray.put(perturbed), version + 1)
    assert result["policy_version"] == version + 1
    assert result["tensors"] == len(original)
    changed = inference.generate.remote(PROMPT, GREEDY).result()
    assert changed["policy_version"] == version + 1
    assert changed["response_ids"] != before["response_ids"]
    assert inference.weights_checksum.remote().result() != checksum_before

    push_state(inference, ray.put({k: v.numpy() for k, v in original.items()}), version + 2)
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
    update = inference.broadcast(
        InferenceServer.update_weights.__name__, "object_store", {"state": [weights]}, version + 1
    )
    out = long_request.result()
    [res] = update.results()
    assert out["policy_version"] == version
    assert res["policy_version"] == version + 1
    assert inference.generate.remote(PROMPT, GREEDY).result()["policy_version"] == version + 1


def test_seeded_requests_whose_prompts_queue_up_do_not_kill_a_cpu_engine(inference):
    """12 seeded requests of 700 prompt tokens at once: more than one engine step's token budget. With chunked
    prefill vLLM split a prompt across steps and rewound its seeded CPU generator, which has no offset: the engine
    died ("CPU Generator does not use offset"). Each prompt now runs whole, and each seed still decides its sample."""
    prompts = [[10 + (31 * i + 7 * j) % 4000 for j in range(700)] for i in range(12)]
    sampling = {"temperature": 1.0, "max_tokens": 8}

    async def run() -> list[dict[str, Any]]:
        calls = [inference.generate.remote(p, {**sampling, "seed": i}) for i, p in enumerate(prompts)]
        return await asyncio.gather(*calls)

    outs = asyncio.run(run())
    assert [len(o["response_ids"]) for o in outs] == [8] * 12
    again = inference.generate.remote(prompts[3], {**sampling, "seed": 3}).result()
    assert again["response_ids"] == outs[3]["response_ids"]


def test_prompt_token_totals_count_prefix_cache_hits_and_the_reset_of_an_update(inference, tiny_model_dir):
    """The replica's running totals for the step metrics: a prompt sent again is mostly in the prefix cache (to
    the last whole block before its final token), and after a weight update, which empties the cache, it is
    computed again in full."""
    prompt = [10 + (37 * i) % 4000 for i in range(300)]  # this test's own: no other test cached it

    def grown(call: Callable[[], Any]) -> tuple[int, int]:
        before = inference.load_totals.remote().result()
        call()
        after = inference.load_totals.remote().result()
        assert after["busy_s"] > before["busy_s"]
        return tuple(after[k] - before[k] for k in ("prompt_tokens", "cached_prompt_tokens"))

    def generate() -> None:
        inference.generate.remote(prompt, GREEDY).result()

    assert grown(generate) == (300, 0)
    again, cached = grown(generate)
    assert again == 300 and 0 < cached < 300
    version = inference.policy_version.remote().result()
    push_state(inference, ray.put(load_file(str(tiny_model_dir / "model.safetensors"))), version + 1)
    assert grown(generate) == (300, 0)


@pytest.fixture(scope="module")
def interruptible(ray_cluster, tiny_config, tiny_model_dir):
    """A second deployment whose weight updates interrupt requests in flight (`inference.on_update`)."""
    from ray import serve

    from lightning_ray.inference.server import deploy_inference

    icfg = tiny_config.inference.model_copy(update={"on_update": "interrupt"})
    yield deploy_inference(tiny_model_dir, tiny_config.model, icfg, app_name="lightning-ray-interrupt-test")
    serve.delete("lightning-ray-interrupt-test")


@pytest.mark.slow  # CI time (its own deployment, ~110-180 s); updates under load: test_update_waits_for_in_flight_requests
def test_interrupted_request_goes_on_with_the_new_weights_and_exact_ids(interruptible, tiny_model_dir):
    """A greedy request that spans an update: its tokens before the update come from the old version, those
    after from the new one, and the part after is exactly what the new weights generate from the prompt plus
    the part before (ids and log-probs)."""
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.manual_seed(2)
    perturbed = ray.put({k: v + 0.3 * torch.randn_like(v) for k, v in original.items()})
    version = interruptible.policy_version.remote().result()
    sampling = {"temperature": 0.0, "max_tokens": 900}

    async def spanning_request():
        # Company in the engine's batch, so that the update lands while the request still has tokens to go.
        others = [
            interruptible.generate.remote(PROMPT, {"temperature": 1.0, "max_tokens": 900, "seed": i})
            for i in range(8)
        ]
        deltas, update = [], None
        async for d in interruptible.options(stream=True).generate_stream.remote(PROMPT, sampling):
            deltas.append(d)
            if update is None and sum(len(x["response_ids"]) for x in deltas) >= 8:
                # From a thread, as the driver's sync does: a broadcast is sent when its results are awaited.
                update = asyncio.create_task(
                    asyncio.to_thread(push_state, interruptible, perturbed, version + 1)
                )
        for other in others:
            out = await other
            assert len(out["response_versions"]) == len(out["response_ids"]) == len(out["response_logprobs"])
        return deltas, (await update)[0]

    try:
        deltas, res = asyncio.run(spanning_request())
        assert res["policy_version"] == version + 1
        ids = [t for d in deltas for t in d["response_ids"]]
        lps = [lp for d in deltas for lp in d["response_logprobs"]]
        versions = [d["policy_version"] for d in deltas for _ in d["response_ids"]]
        assert len(lps) == len(ids) <= sampling["max_tokens"]
        assert deltas[-1]["finish_reason"] in ("stop", "length")
        assert versions == sorted(versions) and set(versions) == {version, version + 1}, (
            f"no token after the update: {len(ids)} tokens, finish {deltas[-1]['finish_reason']}, {res}"
        )
        cut = versions.index(version + 1)
        rest = interruptible.generate.remote(
            PROMPT + ids[:cut], {**sampling, "max_tokens": sampling["max_tokens"] - cut}
        ).result()
        assert rest["response_ids"] == ids[cut:]
        assert np.allclose(rest["response_logprobs"], lps[cut:], atol=1e-4)
        assert rest["response_versions"] == [version + 1] * len(rest["response_ids"])
    finally:
        push_state(interruptible, ray.put(original), version + 2)
