#!/usr/bin/env bash
# Install llama.cpp's Python binding (llama-cpp-python), which compiles llama.cpp from its source
# package: about 6 minutes on 2 cores the first time. The wheel is kept in a cache folder keyed by
# the version and this CPU's instruction set (the build is -march=native), so later runs install
# it in seconds.
#   bash scripts/install_llamacpp.sh            # into the active Python environment
set -euo pipefail
version="${LLAMA_CPP_VERSION:-0.3.36}"
cpu="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)"
cache="${LLMP_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmp/wheels}/llama-cpp-$version-$cpu-noamx"
if ! ls "$cache"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version into $cache (once; ~6 min on 2 cores)"
  mkdir -p "$cache"
  start=$(date +%s)
  # Only the library: no multimodal (llava/mtmd) part, tests, examples, tools or server. No AMX
  # kernels: on a Xeon VM that lists AMX, ggml's AMX q8_0 matmul died of SIGILL at its first
  # `tilezero` (llama-cpp-python 0.3.36); the explicit -mno-amx-* win over -march=native.
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx' -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -w "$cache.tmp"
  mv "$cache.tmp"/llama_cpp_python-*.whl "$cache"/ && rmdir "$cache.tmp"
  echo "built in $(( $(date +%s) - start )) s"
fi
pip install -q "$cache"/llama_cpp_python-"$version"-*.whl
