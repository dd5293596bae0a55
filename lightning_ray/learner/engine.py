"""DeepSpeed set-up for one learner rank: the process group, the model (optionally LoRA) and the engine.

On this machine's CPU DeepSpeed would JIT-compile two native ops on first use (~50 s shm comm, ~60 s
cpu_adam): the optimizer is a plain `torch.optim.AdamW` and the shm comm op is marked incompatible before the
process group starts, so DeepSpeed falls back to plain torch.distributed (gloo / nccl).

A step whose global gradient norm is not finite is skipped, with the gradients cleared and the weights and
optimizer state untouched: DeepSpeed's wrapped optimizers (ZeRO 1-3, bf16) do that themselves and count it in
`engine.skipped_steps`; plain fp32 without ZeRO hands the gradients to the optimizer as they are, so there the
optimizer is `ClippedAdamW`, which does the same.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from typing import Any

import torch

from lightning_ray.config import LearnerConfig
from lightning_ray.learner import tree_attention

SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.ShareMemCommBuilder.NAME


def resolve_backend(cfg: LearnerConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "gloo"


def worker_clips(cfg: LearnerConfig) -> bool:
    """Plain fp32 without ZeRO: DeepSpeed clips but does not report the norm, so the worker clips itself."""
    return cfg.zero_stage == 0 and cfg.precision == "float32"


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config for a learner section. The caller owns gradient accumulation: every `step()` is an
    optimizer step over the micro-batches backpropagated since the last one (`managed_gradient_accumulation`
    off), so a train step can use any number of micro-batches."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload and cfg.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload and cfg.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero_stage >= 2:
        zero["overlap_comm"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if worker_clips(cfg) else cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> dict[str, Any]:
    """Where this process runs (Ray node, IP) and a free port for a rendezvous hosted here."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "port": free_port(),
        "pid": os.getpid(),
    }


def join_process_group(
    cfg: LearnerConfig,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    local_rank: int,
    timeout_s: float,
) -> str:
    """Join the learners' process group (blocks until every rank has joined); returns its backend. A collective
    that waits more than `timeout_s` for a peer (a rank that died) fails instead of hanging."""
    use_gpu = cfg.num_gpus_per_worker > 0 and torch.cuda.is_available()
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its device is always index 0.
        LOCAL_RANK="0" if use_gpu else str(local_rank),
    )
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # skip the ~50 s JIT build of the shm op
    backend = resolve_backend(cfg)
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s)
    )
    return backend


def attention_implementation(cfg: LearnerConfig) -> str:
    """`learner.attention`, with auto resolved, and `tree` registered with transformers when chosen. Packed,
    FlexAttention takes the trie rule as a sparse BlockMask on a GPU; on a CPU, `tree` computes it chain by
    chain (no compile step; SDPA over the dense mask computed every pair, at up to 1.6x the bfloat16 step time).
    Padded rows take SDPA."""
    choice = cfg.attention
    if choice == "auto":
        gpu = cfg.num_gpus_per_worker > 0 and torch.cuda.is_available()
        choice = ("flex_attention" if gpu else tree_attention.NAME) if cfg.packing else "sdpa"
    if choice == tree_attention.NAME:
        tree_attention.register()
    return choice


def load_model(model_path: str, cfg: LearnerConfig) -> tuple[torch.nn.Module, int]:
    """The trainable policy in fp32 (DeepSpeed casts it for bf16), wrapped by peft when `learner.lora` is set,
    and its pad token id."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=attention_implementation(cfg)
    )
    model.config.use_cache = False
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if cfg.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("learner.lora needs the peft package: pip install peft") from e
        lora = LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            target_modules=list(cfg.lora.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, pad_id


def load_reference_model(model_path: str, cfg: LearnerConfig, device: torch.device) -> torch.nn.Module:
    """The frozen initial policy for the KL term (a full copy per rank, also under ZeRO-3)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.precision == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, attn_implementation=attention_implementation(cfg)
    ).to(device)
    return model.eval().requires_grad_(False)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW for plain fp32 without ZeRO, where DeepSpeed neither clips nor checks the gradients: it clips
    them to `max_grad_norm` (after DeepSpeed averaged them over the ranks, so every rank sees the same norm)
    and skips the step when their norm is not finite. The norm is summed in float64 as DeepSpeed's ZeRO
    stages do, so every stage calls the same gradients finite. `overflow` and `_global_grad_norm` are the
    attributes DeepSpeed's engine reads from its own wrapped optimizers: it counts the skip, reports the norm."""

    def __init__(self, params: list[torch.nn.Parameter], *, max_grad_norm: float, **kw: Any):
        super().__init__(params, **kw)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm = math.nan

    def step(self, closure: Any = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.stack([p.grad.double().norm() for p in params]).norm() if params else torch.zeros(())
        self._global_grad_norm = float(norm)
        torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        return None if self.overflow else super().step(closure)


def build_engine(cfg: LearnerConfig, model: torch.nn.Module) -> Any:
    """The DeepSpeed engine: AdamW over the trainable parameters, in train mode."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    adamw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    optimizer = (
        ClippedAdamW(params, max_grad_norm=cfg.max_grad_norm, **adamw)
        if worker_clips(cfg)
        else torch.optim.AdamW(params, **adamw)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg), dist_init_required=False
    )
    engine.train()
    return engine
