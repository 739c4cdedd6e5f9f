#!/usr/bin/env bash
# Builds llama-cpp-python (the GGUF export's oracle in the tests) from its PyPI source package once and
# keeps the wheel, so that a second `bash scripts/setup.sh test` installs it without rebuilding.
# Usage: bash scripts/llama_cpp_wheel.sh PYTHON   -> prints the folder holding the wheel (for --find-links)
#
# Cost: a C++ build of llama.cpp, a few minutes on 2 free cores (20 minutes measured on 2 cores shared with
# other jobs); the wheel is ~20 MB. Only the library is built (no llava/mtmd: the tests need no images). On x86-64 the kernels are
# built for AVX2/FMA/F16C, not -march=native: the cache may be shared by machines with different CPUs
# (AVX-512 or AMX on one and not the other would crash with an illegal instruction); the flags name
# the cache folder, so another choice builds its own wheel.
# Cache: ${MLX_PERSONA_CACHE:-~/.cache/mlx_persona}/wheels/, private (0700).
set -euo pipefail
PY="${1:?usage: llama_cpp_wheel.sh PYTHON}"
VERSION=0.3.36
FLAGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
TAG=generic
if [ "$(uname -m)" = x86_64 ]; then
  FLAGS="$FLAGS -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  TAG=avx2
fi
ROOT="${MLX_PERSONA_CACHE:-$HOME/.cache/mlx_persona}"
DIR="$ROOT/wheels/llama-cpp-python-$VERSION-$TAG"
mkdir -p "$ROOT"
(umask 077; mkdir -p "$ROOT/wheels" "$DIR")
chmod 700 "$ROOT/wheels" "$DIR"
if ! ls "$DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python $VERSION from source (once; cached in $DIR)" >&2
  # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and would hand back a build with other flags.
  BUILD="$(mktemp -d)"  # private; the wheel lands in the cache only when complete
  trap 'rm -rf "$BUILD"' EXIT
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    nice -n 10 "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" \
    -w "$BUILD" >&2
  mv "$BUILD"/llama_cpp_python-"$VERSION"-*.whl "$DIR"/
fi
echo "$DIR"
