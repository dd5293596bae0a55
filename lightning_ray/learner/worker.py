"""One DeepSpeed learner rank, run as a Ray actor by `LearnerGroup`.

Each rank holds a DeepSpeed engine (ZeRO 0-3, fp32 or bf16, optional CPU offload, optional LoRA through peft),
turns its Arrow shard into padded micro-batches, and takes GRPO/PPO steps. Every method that touches the
model is collective: the group calls it on all ranks at once, and ranks pad their micro-batch count to the
largest one so that ZeRO's gathers and reductions line up.

On this machine's CPU DeepSpeed would JIT-compile two native ops on first use (~50 s shm comm, ~60 s
cpu_adam): the optimizer is a plain `torch.optim.AdamW` and the shm comm op is marked incompatible before the
process group starts, so DeepSpeed falls back to plain torch.distributed (gloo / nccl).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lightning_ray.algorithms.losses import loss_denominator, policy_loss, token_entropy, token_logprobs
from lightning_ray.config import AlgorithmConfig, LearnerConfig
from lightning_ray.learner.batch import padding_batch, split_micro_batches, table_to_batch
from lightning_ray.weight_group import (
    GroupSpec,
    WeightGroup,
    device_identity,
    host_store,
    new_spec,
    transfer_device,
)
from lightning_ray.weight_ipc import SharedWeights

SHM_COMM_OP = "deepspeed_shm_comm"  # deepspeed.ops.op_builder.cpu.ShareMemCommBuilder.NAME
CHECKPOINT_MARKER = "lightning_ray_checkpoint.json"
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "engine"
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")


def resolve_backend(cfg: LearnerConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if cfg.num_gpus_per_worker > 0 and torch.cuda.is_available() else "gloo"


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
        # Plain fp32 without ZeRO: DeepSpeed clips but does not report the norm, so the worker clips itself.
        "gradient_clipping": 0.0 if _worker_clips(cfg) else cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _worker_clips(cfg: LearnerConfig) -> bool:
    return cfg.zero_stage == 0 and cfg.precision == "float32"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a peft wrapper (or the model itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def forward_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, R]` of the response tokens (and their entropies) from one forward pass.

    Only the last R + 1 positions get logits (`logits_to_keep`); masked positions are zeroed with `where`
    so a padded position can never leak a NaN into the loss.
    """
    r = batch["targets"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=r + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]
    mask = batch["response_mask"] > 0
    logp = torch.where(mask, token_logprobs(logits, batch["targets"]), 0.0)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.where(mask, token_entropy(logits.detach()), 0.0)
    return logp, entropy


def _lora_merge(named: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fold LoRA factors into their base weights (W + scaling * B @ A) and return plain HF names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        if ".lora_" in name:
            continue
        hf_name = name.removeprefix("base_model.model.")
        if ".base_layer." in name:
            layer_name = name.split(".base_layer.")[0]
            hf_name = hf_name.replace(".base_layer.", ".")
            layer = model.get_submodule(layer_name)
            if name.endswith(".weight"):
                for adapter in layer.active_adapters:
                    a = named[f"{layer_name}.lora_A.{adapter}.weight"].float()
                    b = named[f"{layer_name}.lora_B.{adapter}.weight"].float()
                    delta = (b @ a) * layer.scaling[adapter]
                    if getattr(layer, "fan_in_fan_out", False):
                        delta = delta.T
                    tensor = (tensor.float() + delta).to(tensor.dtype)
        out[hf_name] = tensor
    return out


def gather_hf_state_dict(
    module: torch.nn.Module,
    zero_stage: int,
    rank: int,
    device: torch.device | str = "cpu",
    copy: bool = True,
) -> dict[str, torch.Tensor] | None:
    """Full weights with Hugging Face names, copied to `device` (CPU by default), on rank 0 (None elsewhere).
    Collective under ZeRO-3. `copy=False` lets tensors already on `device` share the live parameters' storage
    (ZeRO 0-2; a ZeRO-3 gather is always copied): only for a consumer done with them before the next step.

    Names follow `save_pretrained`: a weight tied to another appears once, under its first name, so for
    SmolLM2 (tie_word_embeddings) there is `model.embed_tokens.weight` and no `lm_head.weight`. LoRA factors
    are merged into their base weights. Dtype is the training dtype (bf16 or fp32).
    """
    named: dict[str, torch.Tensor] = {}
    params = list(module.named_parameters())  # shared (tied) parameters appear once
    if zero_stage == 3:
        import deepspeed

        for name, param in params:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    named[name] = param.data.detach().to(device, copy=True).contiguous()
    elif rank == 0:
        named = {name: param.data.detach().to(device, copy=copy).contiguous() for name, param in params}
    if rank != 0:
        return None
    persistent = set(module.state_dict(keep_vars=True))  # buffers saved by save_pretrained (none in Llama)
    for name, buf in module.named_buffers():
        if name in persistent:
            named[name] = buf.detach().to(device, copy=copy).contiguous()
    if hasattr(module, "peft_config"):
        return _lora_merge(named, module)
    return named


class LearnerWorker:
    """One learner rank. Created by `LearnerGroup` as a Ray actor; `setup()` joins the process group."""

    def __init__(self, model_path: str, learner: dict[str, Any], rank: int, world_size: int, seed: int = 0):
        self.cfg = LearnerConfig.model_validate(learner)
        self.model_path = str(model_path)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        torch.set_num_threads(self.cfg.torch_threads)
        self.engine = None
        self.ref_model: torch.nn.Module | None = None
        self.pad_id = 0
        self.optimizer_steps = 0
        self._grad_norm = float("nan")
        self.weight_group: WeightGroup | None = None  # rank 0 only: the collective path to the vLLM workers
        self._weight_store: torch.distributed.TCPStore | None = None
        self._weight_spec: GroupSpec | None = None
        self._shared_weights: SharedWeights | None = None  # rank 0 only: the ipc hand-off in flight

    # ---------------------------------------------------------------- setup

    def address(self) -> dict[str, Any]:
        """Where this rank runs, and a free port for the rendezvous when it is rank 0."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "port": free_port(),
        }

    def setup(self, master_addr: str, master_port: int, local_rank: int) -> dict[str, Any]:
        """Join the process group and build the DeepSpeed engine (blocks until every rank has joined)."""
        t0 = time.perf_counter()
        use_gpu = self.cfg.num_gpus_per_worker > 0 and torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so its device is always index 0.
            LOCAL_RANK="0" if use_gpu else str(local_rank),
        )
        if not use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # skip the ~50 s JIT build of the shm op
        backend = resolve_backend(self.cfg)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)

        torch.manual_seed(self.seed)
        model = self._load_model()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if _worker_clips(self.cfg):
            optimizer.register_step_pre_hook(self._clip_gradients)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(self.cfg), dist_init_required=False
        )
        self.engine.train()
        trainable = sum(p.numel() for p in params)
        return {"setup_s": time.perf_counter() - t0, "trainable_params": trainable, "backend": backend}

    def _load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        model.config.use_cache = False
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        if self.cfg.lora is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:
                raise ImportError("learner.lora needs the peft package: pip install peft") from e
            lora = LoraConfig(
                r=self.cfg.lora.rank,
                lora_alpha=self.cfg.lora.alpha,
                target_modules=list(self.cfg.lora.target_modules),
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        return model

    def _clip_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Runs inside DeepSpeed's step, after the gradients were averaged over the ranks."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ---------------------------------------------------------------- collectives

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def _micro_batches(self, table: pa.Table) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches, padded with empty ones to the largest count over the ranks."""
        micro = [
            table_to_batch(t, self.pad_id) for t in split_micro_batches(table, self.cfg.micro_batch_size)
        ]
        (n,) = self._all_reduce([len(micro)], "max")
        micro += [padding_batch(self.pad_id) for _ in range(int(n) - len(micro))]
        return micro

    # ---------------------------------------------------------------- training

    def _reference_model(self) -> torch.nn.Module:
        """The frozen initial policy for the KL term (a full copy per rank, also under ZeRO-3)."""
        if self.ref_model is None:
            from transformers import AutoModelForCausalLM

            dtype = torch.bfloat16 if self.cfg.precision == "bfloat16" else torch.float32
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(
                self.device
            )
            self.ref_model.eval().requires_grad_(False)
        return self.ref_model

    def train_step(
        self,
        shard: pa.Table,
        algorithm: dict[str, Any] | AlgorithmConfig,
        max_response_tokens: int | None = None,
    ) -> dict[str, float]:
        """One training step on this rank's shard (a table with an `advantage` column). Collective.

        Old log-probs are recomputed before any update (`old_logprobs: recompute`) or taken from the rollout
        with truncated importance sampling (`rollout`). With `learner.gradient_accumulation_steps` unset the
        whole batch is one optimizer step; with k, every k micro-batches per rank are one (PPO mini-batches).
        `max_response_tokens` is the Dr. GRPO constant for `length_norm: constant` (default: the longest
        response in the batch). Returns global metrics (the same on every rank).
        """
        algo = (
            algorithm if isinstance(algorithm, AlgorithmConfig) else AlgorithmConfig.model_validate(algorithm)
        )
        shard = _resolve(shard)
        t0 = time.perf_counter()
        engine = self.engine
        engine.train()
        micro = [self._to_device(b) for b in self._micro_batches(shard)]
        if not micro:  # no rows on any rank: nothing to learn from (the count is global, so all ranks agree)
            return {"loss": 0.0, "tokens": 0.0, "sequences": 0.0, "micro_batches": 0, "optimizer_steps": 0}
        t_batch = time.perf_counter() - t0

        gas = self.cfg.gradient_accumulation_steps or len(micro)
        # With one optimizer step per train step the weights do not change before the last backward, so the
        # training forward's own detached log-probs *are* the recomputed old log-probs: skip the extra pass.
        recompute = algo.old_logprobs == "recompute"
        separate_pass = recompute and gas < len(micro)
        old: list[torch.Tensor | None] = [None] * len(micro)
        ref: list[torch.Tensor | None] = [None] * len(micro)
        with torch.no_grad():
            for i, b in enumerate(micro):
                if separate_pass:
                    old[i], _ = forward_logprobs(engine, b)
                elif not recompute:
                    old[i] = b["rollout_logprobs"]
                if algo.kl_coef > 0:
                    ref[i], _ = forward_logprobs(self._reference_model(), b)
        t_old = time.perf_counter() - t0 - t_batch

        constant = None
        if algo.length_norm == "constant":
            longest = max(int(b["response_lengths"].max()) for b in micro)
            constant = max_response_tokens or self._all_reduce([longest], "max")[0]
        sums: dict[str, float] = {}
        mismatch = [0.0, 0.0]
        tokens = sequences = loss_total = 0.0
        grad_norms: list[float] = []
        for start in range(0, len(micro), gas):
            chunk = range(start, min(start + gas, len(micro)))
            local = sum(
                float(loss_denominator(micro[i]["response_mask"], algo.length_norm, constant)) for i in chunk
            )
            (denominator,) = self._all_reduce([local])
            for i in chunk:
                b = micro[i]
                logp, entropy = forward_logprobs(engine, b, with_entropy=True)
                old_i = old[i] if old[i] is not None else logp.detach()
                if recompute:  # learner (before this step's update) vs inference engine log-probs
                    mismatch[0] += float(((old_i - b["rollout_logprobs"]).abs() * b["response_mask"]).sum())
                    mismatch[1] += float(b["response_mask"].sum())
                loss, m = policy_loss(
                    logp,
                    old_i,
                    b["advantages"],
                    b["response_mask"],
                    clip_low=algo.clip_low,
                    clip_high=algo.clip_high,
                    length_norm=algo.length_norm,
                    denominator=max(denominator, 1.0),
                    constant=constant,
                    ref_logprobs=ref[i],
                    kl_coef=algo.kl_coef,
                    kl_estimator=algo.kl_estimator,
                    tis_cap=algo.tis_cap if algo.old_logprobs == "rollout" else None,
                )
                # DeepSpeed averages gradients over ranks; the loss is already a share of the global batch.
                engine.backward(loss * self.world_size, scale_wrt_gas=False)
                n = float(b["response_mask"].sum())
                m["entropy"] = entropy.sum() / max(n, 1.0)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n
                tokens += n
                sequences += float((b["response_lengths"] > 0).sum())
                loss_total += loss.item()
            engine.step()
            self.optimizer_steps += 1
            norm = engine.get_global_grad_norm()
            grad_norms.append(float(norm) if norm is not None else self._grad_norm)

        keys = sorted(sums)
        reduced = self._all_reduce([sums[k] for k in keys] + [tokens, sequences, loss_total, *mismatch])
        g_tokens, g_sequences, g_loss, mis_sum, mis_n = reduced[len(keys) :]
        metrics = {k: v / max(g_tokens, 1.0) for k, v in zip(keys, reduced[: len(keys)], strict=True)}
        n_steps = len(range(0, len(micro), gas))
        metrics.update(
            loss=g_loss / n_steps,
            grad_norm=float(np.mean(grad_norms)),
            lr=float(engine.get_lr()[0]),
            tokens=g_tokens,
            sequences=g_sequences,
            micro_batches=len(micro),
            optimizer_steps=n_steps,
            time_batch_s=t_batch,
            time_old_logprobs_s=t_old,
            time_s=time.perf_counter() - t0,
        )
        if algo.old_logprobs == "recompute" and mis_n > 0:
            metrics["logprob_diff_rollout"] = mis_sum / mis_n  # learner vs inference engine, mean |delta|
        return metrics

    def compute_logprobs(self, shard: pa.Table) -> list[np.ndarray]:
        """Log-probs of each row's response tokens under the current weights (float32). Collective."""
        shard = _resolve(shard)
        self.engine.eval()
        out: list[np.ndarray] = []
        with torch.no_grad():
            for b in self._micro_batches(shard):
                lengths = b["response_lengths"].tolist()
                lp, _ = forward_logprobs(self.engine, self._to_device(b))
                lp = lp.float().cpu().numpy()
                out.extend(lp[i, lp.shape[1] - n :].copy() for i, n in enumerate(lengths))
        self.engine.train()
        return out[: shard.num_rows]

    # ---------------------------------------------------------------- weights and checkpoints

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """HF-named full weights on rank 0, None elsewhere. Collective under ZeRO-3."""
        return gather_hf_state_dict(self.engine.module, self.cfg.zero_stage, self.rank)

    def state_dict_ref(self):
        """The weights put once in the object store by rank 0 (an ObjectRef); None on other ranks."""
        import ray

        state = self.state_dict()
        return ray.put(state) if state is not None else None

    # ---------------------------------------------------------------- collective weight sync (rank 0)

    def open_weight_group(self, world_size: int, backend: str, timeout_s: float) -> dict[str, Any]:
        """Host the rendezvous of a new weight group (leaving any old one); returns its spec for the vLLM
        workers. Returns at once: `join_weight_group` then blocks until they have all joined."""
        import ray

        self.close_weight_group()
        host = ray.util.get_node_ip_address()
        self._weight_store = host_store(host, timeout_s)
        self._weight_spec = new_spec(self._weight_store, host, world_size, backend, timeout_s)
        return self._weight_spec.as_dict()

    def join_weight_group(self) -> str:
        """Join the group opened by `open_weight_group` as its rank 0; returns the group id."""
        if self._weight_spec is None:
            raise RuntimeError("join_weight_group before open_weight_group")
        self.weight_group = WeightGroup(self._weight_spec, 0, self._weight_store)
        return self.weight_group.group_id

    def weight_group_spec(self) -> dict[str, Any] | None:
        """The spec of the group this rank has joined (None when it has none)."""
        return self.weight_group.spec.as_dict() if self.weight_group is not None else None

    def weight_device_identity(self, backend: str) -> str | None:
        return device_identity(backend)

    def send_weights(self) -> dict[str, int] | None:
        """Broadcast the HF-named weights into the weight group from rank 0; None on other ranks.

        Collective under ZeRO-3 (every rank takes part in the gathers), so the group calls it on all ranks.
        On a failure rank 0 leaves the group: the driver builds a new one for the next update."""
        group = self.weight_group
        device = group.device if group is not None else "cpu"
        # No copy: the broadcast has finished with the tensors before this actor can take another step.
        state = gather_hf_state_dict(self.engine.module, self.cfg.zero_stage, self.rank, device, copy=False)
        if state is None:
            return None
        if group is None:
            raise RuntimeError("learner rank 0 is in no weight group: the driver must build one first")
        try:
            return group.send(state)
        except BaseException:
            self.close_weight_group()
            raise

    def close_weight_group(self) -> None:
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group, self._weight_store, self._weight_spec = None, None, None

    # ---------------------------------------------------------------- ipc weight hand-off (rank 0)

    def weight_ipc_identity(self, backend: str) -> dict[str, Any]:
        """The Ray node of this rank and, when `backend` is nccl (both sides on GPUs), its GPU's UUID."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "device": device_identity(backend)}

    def share_weights(self, consumers: int, backend: str) -> dict[str, Any] | None:
        """Pack the HF-named weights into shareable buffers (on this rank's GPU under nccl, in host shared memory
        under gloo) and return the hand-off payload for `consumers` vLLM workers; None on other ranks.

        Collective under ZeRO-3 (every rank takes part in the gathers). The buffers stay alive until
        `release_shared_weights`: the caller releases them once every replica has loaded them."""
        self.release_shared_weights()
        device = transfer_device(backend)
        # No copy of the live parameters: packing copies them, and nothing steps before that is done.
        state = gather_hf_state_dict(self.engine.module, self.cfg.zero_stage, self.rank, device, copy=False)
        if state is None:
            return None
        self._shared_weights = SharedWeights.pack(state, device)
        return self._shared_weights.payload(consumers)

    def release_shared_weights(self) -> None:
        if self._shared_weights is not None:
            self._shared_weights.release()
        self._shared_weights = None

    def save_checkpoint(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write an HF model folder (weights, config, tokenizer) plus the DeepSpeed engine state
        (`deepspeed/`: partitioned optimizer and master weights). Collective; the marker file is written last,
        so a folder without it is an incomplete checkpoint."""
        import torch.distributed as dist

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if self.rank == 0:
            (out / CHECKPOINT_MARKER).unlink(missing_ok=True)
            self._write_hf_folder(out, state)
        client = {"optimizer_steps": self.optimizer_steps}
        self.engine.save_checkpoint(
            str(out / ENGINE_DIR), tag=ENGINE_TAG, client_state=client, save_latest=False
        )
        dist.barrier()
        if self.rank == 0:
            marker = {
                "world_size": self.world_size,
                "zero_stage": self.cfg.zero_stage,
                **client,
                "extra": extra,
            }
            (out / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2))

    def _write_hf_folder(self, out: Path, state: dict[str, torch.Tensor]) -> None:
        from huggingface_hub import save_torch_state_dict
        from transformers import AutoConfig

        src = Path(self.model_path)
        for f in src.iterdir():
            if (
                f.is_file()
                and not f.name.endswith(WEIGHT_FILES)
                and f.name not in ("config.json", CHECKPOINT_MARKER)
            ):
                shutil.copy2(f, out / f.name)
        config = AutoConfig.from_pretrained(src)
        config.dtype = "bfloat16" if self.cfg.precision == "bfloat16" else "float32"
        config.save_pretrained(out)
        save_torch_state_dict(state, out, metadata={"format": "pt"})

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore weights, optimizer and step counters from `save_checkpoint`'s folder. Collective.
        Returns the marker (with the caller's `extra`)."""
        marker_path = Path(path) / CHECKPOINT_MARKER
        if not marker_path.is_file():
            raise FileNotFoundError(f"{path} is not a complete learner checkpoint (no {CHECKPOINT_MARKER})")
        marker = json.loads(marker_path.read_text())
        if marker["zero_stage"] != self.cfg.zero_stage or (
            self.cfg.zero_stage > 0 and marker["world_size"] != self.world_size
        ):
            raise ValueError(
                f"{path} was saved with zero_stage={marker['zero_stage']} on {marker['world_size']} learners; "
                f"resume with the same learner.zero_stage and learner.num_workers "
                f"(now {self.cfg.zero_stage} and {self.world_size})"
            )
        load_path, client = self.engine.load_checkpoint(
            str(Path(path) / ENGINE_DIR),
            tag=ENGINE_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the engine state under {path}/{ENGINE_DIR}")
        self.optimizer_steps = int((client or {}).get("optimizer_steps", marker.get("optimizer_steps", 0)))
        return marker


def _resolve(shard: Any) -> pa.Table:
    """A shard is passed as an object ref (resolved by Ray when it is a top-level argument) or a table."""
    if isinstance(shard, pa.Table):
        return shard
    import ray

    if isinstance(shard, ray.ObjectRef):
        return ray.get(shard)
    raise TypeError(f"expected a pyarrow Table or an ObjectRef to one, got {type(shard).__name__}")
