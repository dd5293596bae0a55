"""The sections of a run's YAML, one pydantic model each (the trainer's in `trainer.py`).

Every section forbids unknown keys, so a typo fails with the field path instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from lightning_ray.precision import Precision


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class Section(BaseModel):
    """Unknown keys and non-finite numbers (`.nan`, `.inf`) are errors naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class Placement(Section):
    """Which nodes may host a role's actors (inference replicas, learners, rollout workers). Checked against
    the cluster's nodes before anything starts (`resources.check_placement`)."""

    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom resources (`ray start --resources`) each of the role's actors asks for, e.g. "
        "{inference_node: 0.01}: only nodes that have them host the role.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels (`ray start --labels`) the role's nodes must carry, e.g. {pool: gpu-a}.",
    )

    @field_validator("resources")
    @classmethod
    def _custom_and_positive(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is set by num_cpus/num_gpus fields, not a placement resource")
            if amount <= 0:
                raise ValueError(f"{name}: {amount} must be > 0")
        return resources

    def actor_options(self) -> dict[str, Any]:
        """The Ray actor options that place an actor by this: `resources` and `label_selector`."""
        options: dict[str, Any] = {}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.labels:
            options["label_selector"] = dict(self.labels)
        return options


class ModelConfig(Section):
    path: str = "builtin:smollm2-135m-instruct"
    dtype: Precision = Field(
        "auto", description="auto: bfloat16 where the replica's hardware computes it natively, else float32."
    )
    chat_template: str | None = Field(None, description="Jinja file replacing the tokenizer's chat template.")
    tool_parser: str | None = Field(None, description="vLLM tool-call parser name, e.g. 'hermes'.")


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
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE).")
    enforce_eager: bool = True
    engine_threads: int = Field(1, gt=0, description="Compute threads of a CPU engine.")
    cpu_preload: list[Literal["tcmalloc", "iomp"]] = Field(
        ["tcmalloc", "iomp"],
        description="Libraries a CPU engine's processes preload (LD_PRELOAD), as vLLM's CPU guide advises, when "
        "found on the replica's node: tcmalloc (Debian's libtcmalloc-minimal4, installed by install.sh) and "
        "Intel OpenMP (the intel-openmp wheel). [] preloads nothing. Measured in lightning_ray/inference/cpu_env.py.",
    )
    cpu_threads_bind: str = Field(
        "nobind",
        description="VLLM_CPU_OMP_THREADS_BIND of a CPU engine: 'nobind', 'auto' (vLLM picks cores and reserves "
        "some), or core ids such as '1' or '0-3'.",
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

    def starting_replicas(self) -> int:
        """How many replicas Serve starts the deployment with."""
        autoscaling = self.serve_autoscaling()
        if autoscaling is None:
            return self.num_replicas
        return autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)

    @model_validator(mode="after")
    def _tp_needs_gpus(self) -> InferenceConfig:
        if self.tensor_parallel_size > 1 and self.num_gpus_per_replica < self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs num_gpus_per_replica >= "
                f"{self.tensor_parallel_size}, got {self.num_gpus_per_replica}"
            )
        return self


class RunnersConfig(Section):
    """Remote runners (`lightning_ray.runners`): a train run's task API for agents running outside the cluster."""

    enabled: bool = Field(
        False, description="A train run opens a gateway with the task API (URL in RUN_DIR/runners.json)."
    )
    host: str = Field(
        "127.0.0.1", description="Its bind address; other than loopback needs gateway.auth_token."
    )
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")


class GatewayConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    auth_token: SecretStr | None = Field(
        None,
        description="Required when host is not loopback. A secret: shown as '**********' in the run directory's "
        "config.yaml, wandb and logs (`lightning_ray.config.public_dump`); read it with `token()`.",
    )
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0)
    runners: RunnersConfig = RunnersConfig()

    @model_validator(mode="after")
    def _token_off_loopback(self) -> GatewayConfig:
        if not is_loopback(self.host) and not self.token():
            raise ValueError(f"host={self.host!r} is not loopback: set gateway.auth_token")
        if self.runners.enabled and not is_loopback(self.runners.host) and not self.token():
            raise ValueError(f"runners.host={self.runners.host!r} is not loopback: set gateway.auth_token")
        return self

    def token(self) -> str | None:
        """The bearer token in clear, for the gateway and its clients only; None when unset or empty."""
        return self.auth_token.get_secret_value() or None if self.auth_token is not None else None


class RolloutConfig(Section):
    agent: str = Field("examples.calc.agent:calc_agent", description="module:function or module:Class")
    num_workers: int = Field(2, gt=0, description="Workers a run starts with.")
    min_workers: int | None = Field(
        None,
        gt=0,
        description="Elastic workers: the fewest the run scales down to (unset: num_workers). With min_workers < "
        "max_workers the run scales on queue depth (`lightning_ray.rollouts.scaling`) and `lightning-ray scale` "
        "sets a count by hand.",
    )
    max_workers: int | None = Field(None, gt=0, description="The most workers (unset: num_workers).")
    scale_up_delay_s: float = Field(
        10.0, ge=0, description="How long the queue must ask for more workers before one is added."
    )
    scale_down_delay_s: float = Field(
        60.0,
        ge=0,
        description="How long the queue must need fewer workers before one is drained and stopped.",
    )
    num_cpus_per_worker: float = Field(0.25, gt=0)
    placement: Placement = Placement()
    concurrency: int = Field(8, gt=0, description="Concurrent rollouts per worker.")
    timeout_s: float = Field(120.0, gt=0)
    lease_timeout_s: float = Field(300.0, gt=0)
    max_attempts: int = Field(2, gt=0)
    max_hung_threads: int = Field(
        16,
        gt=0,
        description="Agent threads a rollout worker may have left running (agents that would not stop when their "
        "rollout timed out, threads they leaked) before it takes no more work and is replaced: a thread cannot be "
        "killed, a process can.",
    )
    max_worker_restarts: int = Field(
        8,
        ge=0,
        description="Rollout workers that die are replaced (their leased rollouts run again elsewhere); after this "
        "many replacements in one run, the run stops with the workers' causes.",
    )
    max_failure_rate: float = Field(0.5, ge=0, le=1, description="Stop the run above this failure rate.")
    train_agents: list[str] | None = Field(
        None, description="Agent roles whose calls are trained; all if unset."
    )
    frozen_agents: list[str] = Field(
        default_factory=list,
        description="Untrained roles served by a frozen snapshot of the starting policy (a second inference "
        "deployment that never receives weight updates); the other roles use the live policy.",
    )

    @property
    def worker_bounds(self) -> tuple[int, int]:
        """(min_workers, max_workers), unset ones as `num_workers`."""
        return self.min_workers or self.num_workers, self.max_workers or self.num_workers

    @model_validator(mode="after")
    def _workers_within_bounds(self) -> RolloutConfig:
        lo, hi = self.worker_bounds
        if not lo <= self.num_workers <= hi:
            raise ValueError(
                f"rollout.num_workers={self.num_workers} must lie within rollout.min_workers={lo} and "
                f"rollout.max_workers={hi}"
            )
        return self

    @model_validator(mode="after")
    def _frozen_roles_are_not_trained(self) -> RolloutConfig:
        if not self.frozen_agents:
            return self
        if self.train_agents is None:
            raise ValueError(
                f"frozen_agents={self.frozen_agents} needs train_agents: unset, every role is trained, the "
                "frozen ones included"
            )
        both = sorted(set(self.frozen_agents) & set(self.train_agents))
        if both:
            raise ValueError(
                f"frozen_agents and train_agents both name {both}: a role is trained or frozen, not both"
            )
        return self


class DataConfig(Section):
    train: str = "examples/calc/data/train.jsonl"
    val: str | None = "examples/calc/data/val.jsonl"
    shuffle: bool = True
    seed: int = 0


class LoraConfig(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class LearnerConfig(Section):
    num_workers: int = Field(1, gt=0)
    num_cpus_per_worker: float = Field(1.0, gt=0)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    placement: Placement = Placement()
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Precision = Field(
        "float32", description="auto: bfloat16 where the rank's hardware computes it natively, else float32."
    )
    packing: bool = Field(True, description="Tokens shared by rows once, no padding (learner.packing).")
    max_tokens_per_micro_batch: int = Field(2048, gt=0, description="With packing; a longer row goes alone.")
    attention: Literal["auto", "sdpa", "flex_attention", "eager"] = "auto"  # see learner.engine
    micro_batch_size: int = Field(4, gt=0, description="Without packing: rows per micro-batch.")
    gradient_accumulation_steps: int | None = Field(
        None, gt=0, description="Unset: the whole batch per step."
    )
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    offload: bool = False
    lora: LoraConfig | None = None
    torch_threads: int = Field(1, gt=0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class AlgorithmConfig(Section):
    name: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "sft"] = Field(
        "grpo", description="sft: supervised fine-tuning on selected trajectories (the `sft` section)."
    )
    group_size: int = Field(4, gt=0)
    norm_std: bool = True
    length_norm: Literal["token", "sequence", "constant"] = "token"
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    kl_coef: float = Field(0.0, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k3"
    drop_zero_variance: bool = True
    old_logprobs: Literal["recompute", "rollout", "decoupled"] = Field(
        "recompute",
        description="The PPO ratio's denominator (see `algorithms.losses.policy_loss`). 'recompute': the "
        "learner's log-probs before the update (exact only with trainer.max_staleness: 0). 'rollout': the "
        "engine's (behaviour) log-probs, the unclipped ratio truncated at tis_cap. 'decoupled': decoupled PPO "
        "(AReaL): clipped around the recomputed log-probs, each token weighted by min(recomputed / behaviour, "
        "tis_cap); corrects stale rollouts.",
    )
    tis_cap: float = Field(
        2.0, gt=0, description="Cap of the importance weight for old_logprobs rollout and decoupled."
    )
    merge_prefix_turns: bool = False

    @model_validator(mode="after")
    def _sft_keeps_uniform_groups(self) -> AlgorithmConfig:
        """SFT keeps the best samples of each group, so a group whose samples all earned the same reward is no
        reason to drop it: `drop_zero_variance` is off under `name: sft`."""
        if self.name == "sft" and self.drop_zero_variance:
            self.drop_zero_variance = False
        return self


class LoggingConfig(Section):
    wandb: bool = False
    wandb_project: str = "lightning-ray"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    report: bool = True
    view: bool = Field(
        True, description="`train` serves the live run page (`lightning-ray view`) beside the run."
    )
    view_host: str = Field(
        "127.0.0.1", description="Where the run page binds; elsewhere it requires a token."
    )
    view_port: int = Field(0, ge=0, le=65535, description="0 takes a free port.")


class RayConfig(Section):
    address: str | None = Field(None, description="Unset: join RAY_ADDRESS or start a local cluster.")
    num_cpus: float | None = Field(None, gt=0, description="Logical CPUs of a local cluster.")
    namespace: str = "lightning-ray"
    run_id: str | None = Field(
        None,
        description="Scopes the names of this run's Serve apps, task pools and rollout workers so runs can share "
        "a cluster (`lightning_ray.names`). Unset: train and rollout make one from the run directory's name.",
    )
