#!/usr/bin/env bash
# The wheels llmp needs on the lent GPU machine beyond what it has (Python 3.12, torch, transformers,
# lightning, peft, torchmetrics, accelerate, safetensors, sentencepiece, pytest, numpy; no network
# there), for Python 3.12 on manylinux x86-64, into bench/gpu-wheels/ (git-ignored), which the device
# call carries with the repository (64 MiB in all):
#   bash bench/gpu_wheels.sh
# On the GPU machine, before bench/gpu_check.py:
#   pip install --no-index --no-deps bench/gpu-wheels/*.whl && pip install --no-index --no-deps --no-build-isolation -e .
# DeepSpeed ships no wheel on PyPI: its source is built here into a pure-Python wheel (no ops
# compiled: on the GPU it compiles the CUDA ops it uses with nvcc, once, at first use).
# Not carried: datasets and lm-eval (imported only for hub data and zero-shot tasks, which the GPU
# check does not run), matplotlib (the report then has no plot), vLLM (far beyond 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/gpu-wheels
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
python=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
pin() { for name in "$@"; do echo "$name==$(python -c "import importlib.metadata as m; print(m.version('$name'))")"; done; }
# The versions this checkout's environment runs (its CI installs them), so the GPU runs the same code.
wanted=($(pin jsonargparse docstring-parser typeshed-client gguf hjson py-cpuinfo einops msgpack ninja \
          pydantic pydantic-core annotated-types typing-inspection psutil pyyaml))
pip download -q --no-deps --only-binary=:all: "${python[@]}" -d "$out.tmp" "${wanted[@]}"
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation "$(pin deepspeed)" -w "$out.tmp"
rm -rf "$out" && mv "$out.tmp" "$out"
du -ch "$out"/*.whl | tail -1
ls "$out"
