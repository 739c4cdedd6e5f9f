#!/usr/bin/env bash
# Sets up mlx_persona in ./.venv on a fresh machine. Usage: bash scripts/setup.sh [core|test]
#   core: the package (mlx, mlx-lm, ...) and, on Linux, OpenBLAS (MLX's bundled BLAS is ~20x slower),
#         g++ (MLX compiles its fused CPU kernels with it) and the cpu-quant extra (nanobind, CMake: the
#         quantized-matmul extension is built with them on first use).
#   test: also the test extras (torch CPU, onnx, onnxruntime, peft, gguf, llama-cpp-python, and oneMKL on
#         x86-64 Linux for MLX_PERSONA_MATMUL=bf16), Chromium and transformers.js for the browser test,
#         and Go (its text/template renders the Ollama Modelfile in the tests). llama-cpp-python has only
#         a source package: scripts/llama_cpp_wheel.sh builds it once (~4 minutes) and caches the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-core}"
PY="${PYTHON:-python3}"

apt_install() {
  # Debian/Ubuntu only; as root directly, otherwise through sudo when it needs no password.
  command -v apt-get >/dev/null || { echo "setup: no apt-get; install $* yourself" >&2; return 0; }
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "setup: please run: sudo apt-get install -y ${missing[*]}" >&2; return 0; fi
  fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

if [ "$(uname -s)" = Linux ]; then
  # g++: MLX builds its fused CPU kernels with it at run time (without it, nothing is fused).
  command -v g++ >/dev/null || apt_install g++
  apt_install libopenblas0-pthread
  [ "$what" = test ] && apt_install chromium golang
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if [ "$what" = test ]; then
  python -m pip install -q -e ".[test]" --find-links "$(bash scripts/llama_cpp_wheel.sh python)"
elif [ "$(uname -s)" = Linux ]; then
  python -m pip install -q -e ".[cpu-quant]"
else
  python -m pip install -q -e .
fi

if [ "$what" = test ] && [ -f mlx_persona/export/web/package.json ]; then
  command -v npm >/dev/null || apt_install nodejs npm
  (cd mlx_persona/export/web && npm ci --silent --no-audit --no-fund)
fi
echo "setup ($what): done. Activate with: . .venv/bin/activate" >&2
