"""vLLM replicas as a Ray Serve deployment: token ids in, token ids and log-probs out, weights swapped in place.

Every response carries the policy version that produced it. A weight update closes the admission gate,
waits for in-flight requests to finish (drain), reloads, bumps the version and reopens: a response is never
produced by a mix of two policies.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from lightning_ray.config import InferenceConfig, ModelConfig

APP_NAME = "lightning-ray-inference"
DEPLOYMENT_NAME = "InferenceServer"
STICKY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed")


def engine_env(inference: InferenceConfig) -> dict[str, str]:
    """Environment of a replica process; vLLM reads it at import, so it must be set before the actor starts."""
    quiet = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if inference.num_gpus_per_replica > 0:
        return quiet
    return {
        **quiet,
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(inference.kv_cache_gib))),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(inference.engine_threads),
    }


def _sampling_params(sampling: dict[str, Any], stream: bool):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling keys: {sorted(unknown)}")
    params = {k: v for k, v in sampling.items() if v is not None}
    return SamplingParams(
        **params,
        n=1,
        logprobs=0,
        detokenize=bool(params.get("stop")),
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


class InferenceServer:
    """One vLLM engine. Used as a Ray Serve deployment (see `inference_app`)."""

    def __init__(self, model_dir: str, model: dict, inference: dict, served_name: str):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        mcfg, icfg = ModelConfig(**model), InferenceConfig(**inference)
        args = AsyncEngineArgs(
            model=model_dir,
            served_model_name=served_name,
            dtype=mcfg.dtype,
            max_model_len=icfg.max_model_len,
            max_num_seqs=icfg.max_num_seqs,
            enforce_eager=icfg.enforce_eager,
            seed=icfg.seed,
            tensor_parallel_size=icfg.tensor_parallel_size,
            gpu_memory_utilization=icfg.gpu_memory_utilization,
            enable_prefix_caching=True,
            worker_extension_cls="lightning_ray.inference.weights.WeightSyncExtension",
            distributed_executor_backend="ray" if icfg.tensor_parallel_size > 1 else None,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.model_dir, self.served_name, self.max_model_len = model_dir, served_name, icfg.max_model_len
        self.version = 0
        self.replica = _replica_name()
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._open = asyncio.Event()
        self._open.set()
        self._update_lock = asyncio.Lock()

    async def _admit(self) -> int:
        await self._open.wait()
        self._inflight += 1
        self._drained.clear()
        return self.version

    def _release(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise TypeError("prompt_ids must be a list of int token ids")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len} (context_length_exceeded)"
            )

    async def generate(self, prompt_ids: list[int], sampling: dict[str, Any]) -> dict[str, Any]:
        """Generate one completion; returns ids, per-token log-probs, finish reason and policy version."""
        response_ids: list[int] = []
        logprobs: list[float] = []
        finish = None
        version = None
        async for delta in self.generate_stream(prompt_ids, sampling):
            response_ids += delta["response_ids"]
            logprobs += delta["response_logprobs"]
            finish, version = delta["finish_reason"], delta["policy_version"]
        return {
            "prompt_ids": list(prompt_ids),
            "response_ids": response_ids,
            "response_logprobs": logprobs,
            "finish_reason": finish,
            "policy_version": version,
            "replica": self.replica,
        }

    async def generate_stream(
        self, prompt_ids: list[int], sampling: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield deltas of new token ids and their log-probs as the engine produces them."""
        from vllm.inputs import TokensPrompt

        self._check_prompt(prompt_ids)
        params = _sampling_params(sampling, stream=True)
        version = await self._admit()
        request_id = uuid.uuid4().hex
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id
            ):
                completion = out.outputs[0]
                ids = list(completion.token_ids)
                lps = [entry[tok].logprob for tok, entry in zip(ids, completion.logprobs or [], strict=True)]
                yield {
                    "response_ids": ids,
                    "response_logprobs": lps,
                    "finish_reason": completion.finish_reason if out.finished else None,
                    "policy_version": version,
                }
        except (asyncio.CancelledError, GeneratorExit):
            await self.engine.abort(request_id)
            raise
        finally:
            self._release()

    async def update_weights(self, state: list[ray.ObjectRef], version: int) -> dict[str, Any]:
        """Replace the weights with the state dict behind `state[0]` (wrapped in a list so Ray does not resolve
        it in the caller), drain in-flight requests first, and serve `version` afterwards."""
        from lightning_ray.inference.weights import write_shared

        async with self._update_lock:
            t0 = time.perf_counter()
            self._open.clear()
            try:
                await self._drained.wait()
                t_drain = time.perf_counter() - t0
                weights = await state[0]
                path = write_shared(weights, tag=f"{self.replica}-v{version}")
                try:
                    counts = await self.engine.collective_rpc("reload_from_file", args=(str(path),))
                finally:
                    path.unlink(missing_ok=True)
                await self.engine.reset_prefix_cache()
                self.version = version
            finally:
                self._open.set()
        return {
            "replica": self.replica,
            "policy_version": version,
            "tensors": counts[0],
            "drain_s": t_drain,
            "total_s": time.perf_counter() - t0,
        }

    async def weights_checksum(self) -> str:
        return (await self.engine.collective_rpc("weights_checksum"))[0]

    def policy_version(self) -> int:
        return self.version

    def model_info(self) -> dict[str, Any]:
        return {
            "model": self.served_name,
            "model_dir": self.model_dir,
            "max_model_len": self.max_model_len,
            "policy_version": self.version,
            "replica": self.replica,
        }

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"local-{os.getpid()}"


def inference_app(model_dir: str | Path, model: ModelConfig, inference: InferenceConfig) -> serve.Application:
    """The Serve application: `num_replicas` engines, sticky per rollout (session id) for prefix-cache reuse."""
    served_name = (
        model.path.removeprefix("builtin:") if model.path.startswith("builtin:") else Path(model.path).name
    )
    actor_options: dict[str, Any] = {
        "num_cpus": inference.num_cpus_per_replica,
        "runtime_env": {"env_vars": engine_env(inference)},
    }
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "num_replicas": inference.num_replicas,
        "max_ongoing_requests": inference.max_num_seqs * 4,
        "request_router_config": RequestRouterConfig(request_router_class=STICKY_ROUTER),
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
    }
    if inference.tensor_parallel_size > 1:
        # vLLM places its TP workers in the replica's placement group; the replica itself needs no GPU.
        options["placement_group_bundles"] = [{"CPU": inference.num_cpus_per_replica}] + [
            {"GPU": 1} for _ in range(inference.tensor_parallel_size)
        ]
        options["placement_group_strategy"] = "STRICT_PACK"
    else:
        actor_options["num_gpus"] = inference.num_gpus_per_replica
    options["ray_actor_options"] = actor_options
    deployment = serve.deployment(InferenceServer).options(**options)
    return deployment.bind(str(model_dir), model.model_dump(), inference.model_dump(), served_name)


def deploy_inference(
    model_dir: str | Path, model: ModelConfig, inference: InferenceConfig
) -> serve.handle.DeploymentHandle:
    """Start Serve without its HTTP proxy (the gateway is our HTTP front) and deploy the engines; blocks until
    every replica is healthy."""
    serve.start(http_options={"location": "NoServer"})
    return serve.run(inference_app(model_dir, model, inference), name=APP_NAME, route_prefix=None)


def inference_handle() -> serve.handle.DeploymentHandle:
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)


def broadcast_weights(state_ref: ray.ObjectRef, version: int, handle=None) -> list[dict[str, Any]]:
    """Push one object-store state dict to every replica (one `ray.put` by the caller, no per-replica copy)."""
    handle = handle or inference_handle()
    return handle.broadcast("update_weights", [state_ref], version).results()
