"""vLLM replicas as a Ray Serve deployment: token ids in, token ids and log-probs out, weights swapped in place.

Every response carries the policy version that produced it. A weight update closes the admission gate,
waits for in-flight requests to finish (drain), reloads, bumps the version and reopens: a response is never
produced by a mix of two policies.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from lightning_ray.config import InferenceConfig, ModelConfig

APP_NAME = "lightning-ray-inference"
# The starting policy for `rollout.frozen_agents`: the same model as APP_NAME, never sent new weights.
FROZEN_APP_NAME = "lightning-ray-inference-frozen"
DEPLOYMENT_NAME = "InferenceServer"
STICKY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
# `json_schema`: the answer must be JSON of this schema (vLLM structured outputs), e.g. for tool_choice "required"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "json_schema")
# Whitespace characters a constrained JSON answer may hold in a row: room for `": "` or a newline and an indent,
# but no room for a degenerate policy (a random model, a collapsed one) to spend max_tokens on whitespace, which the
# plain JSON grammar allows without bound (vLLM bounds it only through a structural tag).
JSON_MAX_WHITESPACE = 4


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
    if "json_schema" in params:
        params["structured_outputs"] = _json_constraint(params.pop("json_schema"))
    return SamplingParams(
        **params,
        n=1,
        logprobs=0,
        detokenize=bool(params.get("stop")),
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def _json_constraint(schema: dict[str, Any]):
    """vLLM structured outputs for JSON of `schema`, whitespace runs bounded by `JSON_MAX_WHITESPACE`."""
    from vllm.sampling_params import StructuredOutputsParams

    json_format = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": JSON_MAX_WHITESPACE}
    tag = {"type": "structural_tag", "format": json_format}
    return StructuredOutputsParams(structural_tag=json.dumps(tag))


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

    async def _swap_weights(self, load: Callable[[], Awaitable[list[int]]], version: int) -> dict[str, Any]:
        """One in-place weight update behind the admission gate: close it, wait for in-flight requests
        (drain), run `load` (it returns each worker's tensor count), reset the prefix cache, serve `version`,
        reopen. Updates run one at a time."""
        async with self._update_lock:
            t0 = time.perf_counter()
            self._open.clear()
            try:
                await self._drained.wait()
                t_drain = time.perf_counter() - t0
                counts = await load()
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

    async def update_weights(self, state: list[ray.ObjectRef], version: int) -> dict[str, Any]:
        """Replace the weights with the state dict behind `state[0]` (wrapped in a list so Ray does not resolve
        it in the caller), drain in-flight requests first, and serve `version` afterwards."""
        from lightning_ray.inference.weights import write_shared

        async def load() -> list[int]:
            weights = await state[0]
            path = write_shared(weights, tag=f"{self.replica}-v{version}")
            try:
                return await self.engine.collective_rpc("reload_from_file", args=(str(path),))
            finally:
                path.unlink(missing_ok=True)

        return await self._swap_weights(load, version)

    # Collective weight sync (`inference.weight_sync: collective`, driven by lightning_ray.weight_sync): every
    # vLLM worker of this engine is a rank of a process group whose rank 0 is learner rank 0.

    async def weight_group_status(self, backend: str) -> dict[str, Any]:
        """This replica's weight group (None unless all its workers are in the same one), how many vLLM workers
        it has (one rank each), its Ray node (its TP workers share it: STRICT_PACK) and the GPUs they would
        use under `backend`. The ipc hand-off reads the same status."""
        workers = await self.engine.collective_rpc("weight_group_status", args=(backend,))
        ids = {(w["group_id"], w["world_size"]) for w in workers}
        group_id, world_size = ids.pop() if len(ids) == 1 else (None, None)
        return {
            "replica": self.replica,
            "node_id": ray.get_runtime_context().get_node_id(),
            "group_id": group_id,
            "world_size": world_size,
            "workers": len(workers),
            "devices": [w["device"] for w in workers],
        }

    async def join_weight_group(self, spec: dict[str, Any], rank_offsets: dict[str, int]) -> str:
        """Join the weight group `spec`, this replica's workers from rank `rank_offsets[replica]` on; returns
        once every rank joined (or fails after the group's timeout)."""
        if self.replica not in rank_offsets:
            raise RuntimeError(
                f"replica {self.replica} was not counted when weight group {spec['group_id']} was sized "
                "(it started in the meantime); the next update rebuilds the group"
            )
        await self.engine.collective_rpc("join_weight_group", args=(spec, rank_offsets[self.replica]))
        return spec["group_id"]

    async def receive_weights(self, group_id: str, version: int) -> dict[str, Any]:
        """Like `update_weights`, with the tensors broadcast by learner rank 0 through weight group `group_id`
        (the learner's send must run concurrently)."""

        async def load() -> list[int]:
            return await self.engine.collective_rpc("receive_weights", args=(group_id,))

        return await self._swap_weights(load, version)

    async def receive_shared_weights(
        self, payload: dict[str, Any], consumer_offsets: dict[str, int], version: int
    ) -> dict[str, Any]:
        """Like `update_weights`, with the tensors mapped from buffers learner rank 0 shares by handle
        (`inference.weight_sync: ipc`); this replica's workers use the handles from
        `consumer_offsets[replica]` on."""
        if self.replica not in consumer_offsets:
            raise RuntimeError(
                f"replica {self.replica} was not counted when the weight hand-off of version {version} was "
                "prepared (it started in the meantime); the next update includes it"
            )

        async def load() -> list[int]:
            args = (payload, consumer_offsets[self.replica])
            return await self.engine.collective_rpc("load_shared_weights", args=args)

        return await self._swap_weights(load, version)

    async def close_weight_group(self) -> None:
        await self.engine.collective_rpc("close_weight_group")

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
        # Serve's access log writes a line per request: thousands per training step in the driver's terminal.
        "logging_config": {"enable_access_log": False},
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
    model_dir: str | Path, model: ModelConfig, inference: InferenceConfig, app_name: str = APP_NAME
) -> serve.handle.DeploymentHandle:
    """Start Serve without its HTTP proxy (the gateway is our HTTP front) and deploy the engines as the Serve app
    `app_name`; blocks until every replica is healthy."""
    serve.start(http_options={"location": "NoServer"})
    return serve.run(inference_app(model_dir, model, inference), name=app_name, route_prefix=None)


def inference_handle(app_name: str = APP_NAME) -> serve.handle.DeploymentHandle:
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)


def broadcast_weights(state_ref: ray.ObjectRef, version: int, handle=None) -> list[dict[str, Any]]:
    """Push one object-store state dict to every replica (one `ray.put` by the caller, no per-replica copy)."""
    handle = handle or inference_handle()
    return handle.broadcast("update_weights", [state_ref], version).results()
