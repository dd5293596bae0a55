"""Weight export: the learner's full weights under Hugging Face names, gathered on rank 0.

This is what checkpoints write and what every weight-sync path sends to vLLM: the names of a
`save_pretrained` folder, LoRA factors folded into their base weights, in the training dtype.
"""

from __future__ import annotations

import torch


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
