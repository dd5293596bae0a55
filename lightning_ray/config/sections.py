"""The sections of a run's YAML, one pydantic model each (the trainer's in `trainer.py`, the inference
service's in `inference.py`, SFT's in `sft.py`).

Every section forbids unknown keys, so a typo fails with the field path instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
    attention: Literal["auto", "tree", "sdpa", "flex_attention", "eager"] = "auto"  # see learner.engine
    micro_batch_size: int = Field(4, gt=0, description="Without packing: rows per micro-batch.")
    gradient_accumulation_steps: int | None = Field(
        None, gt=0, description="Unset: the whole batch per step."
    )
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    offload: bool = False
    lora: LoraConfig | None = None
    torch_threads: Annotated[int, Field(gt=0)] | Literal["auto"] = Field(
        1,
        description="Compute threads of a CPU rank; 'auto' as inference.engine_threads (num_cpus_per_worker).",
    )
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    @model_validator(mode="after")
    def _tree_attention_is_packed(self) -> LearnerConfig:
        if self.attention == "tree" and not self.packing:
            raise ValueError(
                "learner.attention=tree computes the packed trie chain by chain, and learner.packing is false; "
                "set learner.packing=true, or learner.attention to auto or sdpa for padded rows"
            )
        return self


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
