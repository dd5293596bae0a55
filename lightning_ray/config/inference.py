"""The inference section of a run's YAML: the vLLM replicas on Ray Serve, how they sample, and how new weights
reach them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lightning_ray.config.sections import Placement, Section

# KV block size of a CPU engine under `inference.block_size: auto` (see that field).
CPU_BLOCK_SIZE = 32


class SamplingConfig(Section):
    """How the policy samples: the one list of sampling settings, from the YAML to the engine.

    Each field is a vLLM `SamplingParams` argument of the same name. Everything else is derived from these
    fields: the agent's `LLM` (`llm.temperature`, `llm.sampling_kwargs()`), the gateway's defaults and the
    request keys it forwards, and the keys the inference server accepts. A new setting is one field here (plus,
    if requests should be validated at the gateway, one in `gateway/protocol.py`'s `SamplingRequest`).
    """

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    max_tokens: int = Field(256, gt=0)


class CanaryConfig(Section):
    """`inference.canary`: new weights go to a share of the replicas first and reach the rest only when their
    reward on live traffic is not worse than the current policy's by `margin` (lightning_ray/inference/canary.py)."""

    share: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Share of the replicas that load a new version first: ceil(share x replicas), at least "
        "one and never all.",
    )
    margin: float = Field(
        0.05,
        ge=0,
        description="The new version is promoted when its mean reward is at least the current version's minus "
        "margin, else rolled back.",
    )
    min_rewards: int = Field(
        20, gt=0, description="Rewards each version needs (since the canary began) before a decision."
    )
    max_wait_s: float = Field(
        1800.0,
        gt=0,
        description="A new version without min_rewards for both versions after this long is rolled back.",
    )


def check_autoscaling(autoscaling: dict[str, Any]) -> None:
    """`inference.autoscaling` as Ray Serve's `AutoscalingConfig` reads it (which ignores unknown keys, so
    they are checked here); every error names the field."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    where = "inference.autoscaling"
    unknown = sorted(set(autoscaling) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: not a Ray Serve autoscaling field; use one of "
            f"{', '.join(AutoscalingConfig.model_fields)}"
        )
    try:
        parsed = AutoscalingConfig(**autoscaling)
    except ValidationError as e:
        raise ValueError(
            "; ".join(
                f"{'.'.join([where, *map(str, err['loc'])])}: {err['msg'].removeprefix('Value error, ')}"
                for err in e.errors()
            )
        ) from None
    if parsed.min_replicas < 1:
        raise ValueError(
            f"{where}.min_replicas: {parsed.min_replicas}; must be >= 1 (a training run always generates, and a "
            "weight update needs a replica to reach)"
        )


class InferenceConfig(Section):
    num_replicas: int = Field(1, gt=0, description="Fixed number of vLLM replicas (without `autoscaling`).")
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Unset: `num_replicas` fixed replicas. Set: Ray Serve's own `autoscaling_config` of the "
        "inference deployment, passed through as is (min_replicas, max_replicas, initial_replicas, "
        "target_ongoing_requests, upscale_delay_s, downscale_delay_s, ...; checked with Serve's "
        "`AutoscalingConfig` when the config loads); a `num_replicas` the config sets is then the count Serve starts "
        "with (initial_replicas) and must lie within min_replicas..max_replicas. min_replicas must be >= 1 "
        "(a training run always generates). A replica Serve adds loads the policy version published last before it "
        "takes traffic; the resource check before a run counts the replicas Serve starts with (initial_replicas, "
        "else min_replicas); replicas above that wait for room (or for the cluster's autoscaler).",
    )
    num_cpus_per_replica: float = Field(1.0, gt=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, gt=0)
    max_model_len: int = Field(2048, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    scheduling: Literal["fcfs", "oldest_group"] = Field(
        "fcfs",
        description="The order in which a replica's engine admits requests that wait (for one of max_num_seqs "
        "slots, or for room in a step's token budget): 'fcfs' as they arrive; 'oldest_group' by the GRPO group "
        "of the rollout that sent them, the group queued first first (vLLM's priority scheduling). With "
        "trainer.over_provision, the spare groups then take only the engine time the older groups leave. A "
        "running request is not preempted for priority; it binds only while requests wait, so set "
        "max_num_seqs near trainer.tasks_per_step x algorithm.group_size.",
    )
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    block_size: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        "auto",
        description="Tokens per KV-cache block, the unit the prefix cache reuses. 'auto': 32 on a CPU engine "
        "(vLLM's CPU default, 128, recomputes up to 127 tokens of every prompt it has already seen: a group's "
        "shared prompt, a conversation's earlier turns), vLLM's own default on GPU.",
    )
    enforce_eager: bool = True
    engine_threads: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        1,
        description="Compute threads of a CPU engine (its OMP_NUM_THREADS). 'auto': on a local cluster this "
        "machine's cores shared among what computes at once (the engines while agents run; engines and learner "
        "together with trainer.max_staleness >= 1), on a joined cluster num_cpus_per_replica "
        "(lightning_ray/config/threads.py).",
    )
    cpu_preload: list[Literal["tcmalloc", "iomp"]] = Field(
        ["tcmalloc", "iomp"],
        description="Libraries a CPU engine's processes preload (LD_PRELOAD), as vLLM's CPU guide advises, when "
        "found on the replica's node: tcmalloc (Debian's libtcmalloc-minimal4, installed by install.sh) and "
        "Intel OpenMP (the intel-openmp wheel). [] preloads nothing. Measured in lightning_ray/inference/cpu_env.py.",
    )
    cpu_executor: Literal["uni", "mp"] = Field(
        "uni",
        description="Where a CPU engine (tensor_parallel_size 1) runs the model: 'uni' in vLLM's engine-core "
        "process; 'mp' in a worker process of its own (vLLM's CPU default), whose engine core waits for every "
        "forward pass by spinning on shared memory, about a core's worth of CPU. Measured: "
        "benchmarks/results/inference_executor.json.",
    )
    cpu_threads_bind: str = Field(
        "nobind",
        description="VLLM_CPU_OMP_THREADS_BIND of a CPU engine: 'nobind', 'auto' (vLLM picks cores and reserves "
        "some), or core ids such as '1' or '0-3'.",
    )
    canary: CanaryConfig | None = Field(
        None,
        description="Unset (the default): every weight update reaches every replica. Set (`canary: {}` for the "
        "defaults): new weights go to a canary share of the replicas first and are promoted or rolled back "
        "on their live reward (`serve --learn` only: lightning_ray/live/promotion.py); needs at least 2 replicas.",
    )
    seed: int = 0
    sampling: SamplingConfig = SamplingConfig()
    placement: Placement = Placement()
    weight_sync: str = Field(
        "object_store",
        description="How new weights reach every replica after a step: a path of `lightning_ray.weights` "
        "(its docstring has a table of where each works and what it costs). 'object_store': learner rank 0 "
        "puts one state dict in the Ray object store, each replica reloads it through shared memory (the "
        "default). 'collective': a process group between learner rank 0 and every vLLM worker (NCCL when "
        "learners and replicas have GPUs of their own, gloo otherwise); an update that fails there goes "
        "through the object store instead and the group is rebuilt for the next one. 'ipc': learner rank 0 "
        "and the replicas share one node (on GPUs, one GPU): rank 0 packs the tensors into a few buffers and "
        "each vLLM worker maps them by handle (CUDA IPC on a GPU, shared memory on the host).",
    )
    on_update: Literal["finish", "interrupt"] = Field(
        "finish",
        description="What a weight update does to requests in flight. 'finish': they finish on the weights they "
        "started with while new requests wait (the update waits for the longest one). 'interrupt': they are "
        "aborted, the weights load, and each goes on from the tokens it has on the new weights (partial "
        "rollouts, as in AReaL); generation pauses only for the load. Every token records its policy version "
        "either way. Requests under a grammar (tool_choice required) always finish.",
    )
    request_retries: int = Field(
        2,
        ge=0,
        description="How often the gateway re-sends a call whose replica died before answering (Serve restarts "
        "the replica; nothing of the failed attempt is recorded). After that the rollout fails as "
        "inference_error and the pool runs it again.",
    )
    weight_sync_timeout_s: float = Field(
        300.0,
        gt=0,
        description="weight_sync=collective: how long any one step of the group (joining, one broadcast) may "
        "wait for a missing rank before it fails with an error.",
    )

    @field_validator("weight_sync")
    @classmethod
    def _known_weight_path(cls, name: str) -> str:
        from lightning_ray.weights import PATHS

        if name not in PATHS:
            raise ValueError(f"{name!r} is not a weight path; use one of {', '.join(PATHS)}")
        return name

    @field_validator("autoscaling")
    @classmethod
    def _serve_autoscaling(cls, autoscaling: dict[str, Any] | None) -> dict[str, Any] | None:
        if autoscaling is not None:
            check_autoscaling(autoscaling)
        return autoscaling

    @model_validator(mode="after")
    def _replicas_fixed_or_autoscaled(self) -> InferenceConfig:
        if self.autoscaling is None or "num_replicas" not in self.model_fields_set:
            return self
        if "initial_replicas" in self.autoscaling:
            raise ValueError(
                "inference.num_replicas and inference.autoscaling.initial_replicas are both set: with autoscaling, "
                "num_replicas is the initial_replicas; set one"
            )
        try:
            check_autoscaling(self.serve_autoscaling())
        except ValueError as e:
            raise ValueError(
                f"{e} (inference.num_replicas={self.num_replicas} is the initial_replicas)"
            ) from None
        return self

    def serve_autoscaling(self) -> dict[str, Any] | None:
        """The deployment's `autoscaling_config`: `autoscaling`, with `num_replicas` as its `initial_replicas`
        when the config sets `num_replicas`; None for fixed replicas."""
        if self.autoscaling is None:
            return None
        if "num_replicas" in self.model_fields_set:
            return {"initial_replicas": self.num_replicas, **self.autoscaling}
        return dict(self.autoscaling)

    def engine_block_size(self) -> int | None:
        """The KV block size an engine is started with (None: vLLM's default)."""
        if self.block_size != "auto":
            return self.block_size
        return CPU_BLOCK_SIZE if self.num_gpus_per_replica == 0 else None

    def starting_replicas(self) -> int:
        """How many replicas Serve starts the deployment with."""
        autoscaling = self.serve_autoscaling()
        if autoscaling is None:
            return self.num_replicas
        return autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)

    @model_validator(mode="after")
    def _canary_needs_two_replicas(self) -> InferenceConfig:
        if self.canary is None:
            return self
        if self.autoscaling is None:
            where, fewest = "inference.num_replicas", self.num_replicas
        else:  # Serve's own default min_replicas is 1
            where, fewest = "inference.autoscaling.min_replicas", self.autoscaling.get("min_replicas", 1)
        if fewest < 2:
            raise ValueError(
                f"inference.canary: needs at least 2 replicas (a canary share and the rest), but {where} is "
                f"{fewest}"
            )
        return self

    @model_validator(mode="after")
    def _tp_needs_gpus(self) -> InferenceConfig:
        if self.tensor_parallel_size > 1 and self.num_gpus_per_replica < self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs num_gpus_per_replica >= "
                f"{self.tensor_parallel_size}, got {self.num_gpus_per_replica}"
            )
        return self
