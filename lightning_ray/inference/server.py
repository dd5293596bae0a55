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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from lightning_ray.config import InferenceConfig, ModelConfig
from lightning_ray.inference.cpu_env import apply_cpu_preload, engine_env, executor_backend, preload_report
from lightning_ray.inference.engine_args import engine_settings
from lightning_ray.inference.replicas import own_loop
from lightning_ray.inference.sampling import sampling_params
from lightning_ray.monitor.busy import BusyTime
from lightning_ray.weights import object_store, registry
from lightning_ray.weights.receiver import WeightReceiverExtension

APP_NAME = "lightning-ray-inference"
# The starting policy for `rollout.frozen_agents`: the same model as APP_NAME, never sent new weights.
FROZEN_APP_NAME = "lightning-ray-inference-frozen"
DEPLOYMENT_NAME = "InferenceServer"
STICKY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


class InferenceServer:
    """One vLLM engine. Used as a Ray Serve deployment (see `inference_app`).

    The constructor is async (Serve awaits it) so that a replica Serve starts after weight updates (a restart,
    a replica added) loads the weights its app serves now before Serve routes it any traffic."""

    async def __init__(self, model_dir: str, model: dict, inference: dict, served_name: str):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        mcfg, icfg = ModelConfig(**model), InferenceConfig(**inference)
        if icfg.num_gpus_per_replica == 0:
            apply_cpu_preload(icfg.cpu_preload)
        args = AsyncEngineArgs(
            model=model_dir,
            served_model_name=served_name,
            **engine_settings(mcfg, icfg),
            worker_extension_cls=f"{WeightReceiverExtension.__module__}.{WeightReceiverExtension.__name__}",
            distributed_executor_backend=executor_backend(icfg),
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.model_dir, self.served_name, self.max_model_len = model_dir, served_name, icfg.max_model_len
        self.version = 0
        self.replica = _replica_name()
        self._inflight = 0
        self.busy = BusyTime()
        self.prompt_tokens = self.cached_prompt_tokens = 0  # running totals over every engine request
        self._drained = asyncio.Event()
        self._drained.set()
        self._open = asyncio.Event()
        self._open.set()
        self._update_lock = asyncio.Lock()
        self.on_update = icfg.on_update
        self._resumable: set[str] = set()  # in-flight requests an update may interrupt
        self._interrupted: set[str] = set()  # those it did
        await self._load_published()

    async def _load_published(self) -> None:
        """Serve the weights the app's registry names (`lightning_ray.weights.registry`), if any were published;
        read again after each load, so an update published meanwhile is not missed."""
        loaded = None
        while True:
            published = await registry.lookup(self.replica, self.version)
            if published is None or published == loaded:
                return
            try:
                await self.update_weights(object_store.NAME, {"state": published.state}, published.version)
            except Exception as e:
                raise registry.PublishedWeightsUnavailable(
                    f"replica {self.replica} could not load the published weights of policy version "
                    f"{published.version}: {type(e).__name__}: {e}"
                ) from e
            loaded = published

    async def _admit(self) -> int:
        await self._open.wait()
        self.busy.start()
        self._inflight += 1
        self._drained.clear()
        return self.version

    def _release(self) -> None:
        self._inflight -= 1
        self.busy.stop()
        if self._inflight == 0:
            self._drained.set()

    def load_totals(self) -> dict[str, float]:
        """Running totals since this engine started (the driver takes differences): `busy_s`, the seconds it had
        at least one request in flight; `prompt_tokens` its requests' prompts held, and `cached_prompt_tokens`
        the part of them its prefix cache already had. The rest was computed: a weight update empties the
        cache, so every conversation that spans one computes its whole context again on its next call (and
        each resumed request under `on_update: interrupt` counts its prompt again)."""
        return {
            "busy_s": self.busy.seconds(),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise TypeError("prompt_ids must be a list of int token ids")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len} (context_length_exceeded)"
            )

    async def generate(
        self, prompt_ids: list[int], sampling: dict[str, Any], priority: int = 0
    ) -> dict[str, Any]:
        """Generate one completion; returns ids, per-token log-probs and policy versions, the finish reason,
        and `policy_version`, the version the request started on."""
        out: dict[str, Any] = {"response_ids": [], "response_logprobs": [], "response_versions": []}
        async for delta in self.generate_stream(prompt_ids, sampling, priority):
            out["response_ids"] += delta["response_ids"]
            out["response_logprobs"] += delta["response_logprobs"]
            out["response_versions"] += [delta["policy_version"]] * len(delta["response_ids"])
            out.setdefault("policy_version", delta["policy_version"])
            out["finish_reason"] = delta["finish_reason"]
        return {**out, "prompt_ids": list(prompt_ids), "replica": self.replica}

    async def generate_stream(
        self, prompt_ids: list[int], sampling: dict[str, Any], priority: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield deltas of new token ids, their log-probs and the policy version that produced them.
        `priority` orders the request among those waiting for the engine under `inference.scheduling:
        oldest_group` (lower first; vLLM's priority scheduling); the engine ignores it under 'fcfs'.

        With `inference.on_update: interrupt` a weight update aborts this request; it then waits for the new
        weights and goes on from the tokens it has (they become part of the prompt), so the deltas after an
        update carry the new version. A request under a grammar (`json_schema`) cannot restart mid-answer
        and finishes on its weights, as every request does with `on_update: finish`."""
        self._check_prompt(prompt_ids)
        resumable = self.on_update == "interrupt" and "json_schema" not in sampling
        context, budget = list(prompt_ids), sampling.get("max_tokens")
        interrupted = False
        while True:
            version = await self._admit()
            request_id = uuid.uuid4().hex
            if resumable:
                self._resumable.add(request_id)
            try:
                async for delta in self._engine_stream(
                    context, {**sampling, "max_tokens": budget}, request_id, priority
                ):
                    interrupted = request_id in self._interrupted and delta["finish_reason"] == "abort"
                    context += delta["response_ids"]
                    if budget is not None:
                        budget -= len(delta["response_ids"])
                    if delta["response_ids"] or not interrupted:
                        yield {**delta, "finish_reason": None if interrupted else delta["finish_reason"]}
            finally:
                self._resumable.discard(request_id)
                self._interrupted.discard(request_id)
                self._release()
            if not interrupted:
                return
            if (budget is not None and budget <= 0) or len(context) >= self.max_model_len:
                yield {
                    "response_ids": [],
                    "response_logprobs": [],
                    "finish_reason": "length",
                    "policy_version": version,
                }
                return

    async def _engine_stream(
        self, context: list[int], sampling: dict[str, Any], request_id: str, priority: int
    ) -> AsyncIterator[dict[str, Any]]:
        """One engine request's deltas (the request is aborted if the consumer stops early)."""
        from vllm.inputs import TokensPrompt

        params = sampling_params(sampling, stream=True)
        version = self.version
        counted = False
        try:
            async for out in self.engine.generate(
                TokensPrompt(prompt_token_ids=list(context)), params, request_id, priority=priority
            ):
                if not counted:
                    self.prompt_tokens += len(context)
                    self.cached_prompt_tokens += out.num_cached_tokens or 0
                    counted = True
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

    # Weight updates (lightning_ray.weights): `path` is an `inference.weight_sync` name; this replica relays
    # to its vLLM workers, whose `WeightReceiverExtension` does the path's receiving and the load.

    async def weight_status(self, path: str, backend: str) -> dict[str, Any]:
        """This replica's Ray node (its TP workers share it: STRICT_PACK), how many vLLM workers it has, the
        GPUs they would use under `backend`, and the path state its workers all share (e.g. one group id)."""
        workers = await self._on_workers(WeightReceiverExtension.weight_status, path, backend)
        shared = {
            k: v for k, v in workers[0].items() if k != "device" and all(w.get(k) == v for w in workers)
        }
        return {
            **shared,
            "replica": self.replica,
            "node_id": ray.get_runtime_context().get_node_id(),
            "workers": len(workers),
            "devices": [w["device"] for w in workers],
        }

    async def prepare_weights(self, path: str, request: dict[str, Any]) -> None:
        """The path's set-up before a transfer (e.g. join a process group); may block until peers arrive. A
        replica the driver did not plan for (`_planned`) stays out."""
        if self._planned(request):
            await self._on_workers(WeightReceiverExtension.prepare_weights, path, request, self.replica)

    def _planned(self, payload: Any) -> bool:
        """Whether an update or set-up counted this replica: one that numbers the vLLM workers (`worker_slots`)
        did not count a replica Serve added after the driver planned it (autoscaling, a restart), and one for
        some replicas only (`replicas`: a canary's, `lightning_ray.inference.canary`) leaves the others out."""
        if not isinstance(payload, dict):
            return True
        return all(
            payload.get(key) is None or self.replica in payload[key] for key in ("worker_slots", "replicas")
        )

    async def update_weights(
        self, path: str, payload: Any, version: int, if_older: bool = False
    ) -> dict[str, Any]:
        """One in-place update behind the admission gate: close it, interrupt the requests that may go on
        after it (`inference.on_update: interrupt`), wait for the others to finish (drain), let every worker
        receive and load `payload`, reset the prefix cache, serve `version`, reopen. Updates run one at a
        time, and every token is recorded with the version that produced it. With `if_older` a replica that
        already serves `version` (or newer) loads nothing and answers `skipped`."""
        from lightning_ray.weights import PATHS

        async with self._update_lock:
            # A replica the update did not plan for answers `planned: False`; `recovery.converge` brings it to
            # `version` through the registry.
            planned = self._planned(payload)
            if (if_older and self.version >= version) or not planned:
                return {
                    "replica": self.replica,
                    "policy_version": self.version,
                    "skipped": True,
                    "planned": planned,
                    "total_s": 0.0,
                }
            t0 = time.perf_counter()
            self._open.clear()
            try:
                if self._resumable:
                    self._interrupted |= self._resumable
                    await self.engine.abort(list(self._resumable))
                await self._drained.wait()
                t_drain = time.perf_counter() - t0
                async with PATHS[path].stage(payload, f"{self.replica}-v{version}") as staged:
                    counts = await self._on_workers(
                        WeightReceiverExtension.receive_weights, path, staged, self.replica
                    )
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

    async def close_weights(self) -> None:
        await self._on_workers(WeightReceiverExtension.close_weights)

    async def _on_workers(self, method: Callable[..., Any], *args: Any) -> list[Any]:
        """Call a `WeightReceiverExtension` method on every vLLM worker of this engine (one result each)."""
        return await self.engine.collective_rpc(method.__name__, args=args)

    async def weights_checksum(self) -> str:
        return (await self._on_workers(WeightReceiverExtension.weights_checksum))[0]

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

    def engine_processes(self) -> list[dict[str, Any]]:
        """This replica's process and the vLLM processes it spawned, each with the allocator and OpenMP
        libraries really mapped into it and the CPUs it may use (`cpu_env.preload_report`)."""
        return preload_report()

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
    """The Serve application: `num_replicas` engines (or as many as Serve's autoscaling keeps, with
    `inference.autoscaling`), sticky per rollout (session id) for prefix-cache reuse."""
    served_name = (
        model.path.removeprefix("builtin:") if model.path.startswith("builtin:") else Path(model.path).name
    )
    actor_options: dict[str, Any] = {
        "num_cpus": inference.num_cpus_per_replica,
        "runtime_env": {"env_vars": engine_env(inference)},
        **inference.placement.actor_options(),  # which nodes (`inference.placement`)
    }
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": inference.max_num_seqs * 4,
        "request_router_config": RequestRouterConfig(request_router_class=STICKY_ROUTER),
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        # Serve's access log writes a line per request: thousands per training step in the driver's terminal.
        "logging_config": {"enable_access_log": False},
    }
    if inference.autoscaling is not None:
        options["autoscaling_config"] = inference.serve_autoscaling()
    else:
        options["num_replicas"] = inference.num_replicas
    if inference.tensor_parallel_size > 1:
        # vLLM places its TP workers in the replica's placement group; the replica itself needs no GPU.
        options["placement_group_bundles"] = [
            {"CPU": inference.num_cpus_per_replica, **inference.placement.resources}
        ] + [{"GPU": 1} for _ in range(inference.tensor_parallel_size)]
        options["placement_group_strategy"] = "STRICT_PACK"
        if inference.placement.labels:
            options["placement_group_bundle_label_selector"] = [dict(inference.placement.labels)] * (
                1 + inference.tensor_parallel_size
            )
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
    registry.reset(app_name)
    return own_loop(serve.run(inference_app(model_dir, model, inference), name=app_name, route_prefix=None))


def inference_handle(app_name: str = APP_NAME) -> serve.handle.DeploymentHandle:
    return own_loop(serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name))
