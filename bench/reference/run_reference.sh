#!/usr/bin/env bash
# Reference timings/memory of the ORIGINAL LLM-Pruner (horseee/LLM-Pruner, llama3.py: the GQA
# script) on CPU, on the same calibration tokens llmp uses. See README.md beside this file.
#
#   bash bench/reference/run_reference.sh            # setup (idempotent) + all runs
#   STAGE=setup bash bench/reference/run_reference.sh
#   STAGE=run RUNS="smollm2 tl-fp32" REPEATS=2 bash bench/reference/run_reference.sh
#   REF_TIMEOUT=900 ... stops each run after that many seconds (0, the default: never)
#   RESULTS=DIR ... writes the results there instead of $BENCH/ref_results
#   FROM=N ... numbers the repeats from N (run_N.json): side_by_side.sh interleaves single runs
#
# Heavy steps run under `flock "${TMPDIR:-/tmp}/bench.lock"` so they never overlap other benchmarks/tests.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
MAIN=$(cd "$HERE/../.." && pwd)                       # the llmp repo
REF=${REF:-$(pwd)/bench/work/ref}                     # LLM-Pruner work tree + its venv
BENCH=${BENCH:-$(pwd)/bench/work}                      # models, calibration ids, results
GITDIR=${LLMPRUNER_GITDIR:?set LLMPRUNER_GITDIR to a clone of github.com/horseee/LLM-Pruner}
COMMIT=${LLMPRUNER_COMMIT:-128a07d977f9b205d60ab14cfbc6a78f8a8e39d2}
LLMP_VENV=${LLMP_VENV:-$MAIN/.venv}
STAGE=${STAGE:-all}
FROM=${FROM:-1}
RUNS=${RUNS:-"smollm2 tl-fp32"}
REPEATS=${REPEATS:-2}
LOCK="flock "${TMPDIR:-/tmp}/bench.lock""

setup() {
  # 1. LLM-Pruner source at the pinned commit (only the paths needed: the mirror lacks a blob
  #    under lm-evaluation-harness/), then the bench patch.
  if [ ! -f "$REF/LLM-Pruner/llama3.py" ]; then
    mkdir -p "$REF/LLM-Pruner"
    git --git-dir="$GITDIR" archive "$COMMIT" LLMPruner hf_prune.py llama3.py requirement.txt README.md \
      | tar -x -C "$REF/LLM-Pruner"
    (cd "$REF/LLM-Pruner" && patch -p1 < "$HERE/llm-pruner-bench.patch")
  fi
  # 2. Its own venv (never llmp's): torch 2.13 CPU + transformers 4.45.2 (last 4.x before the
  #    attention refactor of 4.48; llama3.py's GQA tracing needs repeat_kv's 5-D expand).
  if [ ! -x "$REF/venv/bin/python" ]; then
    python3 -m venv "$REF/venv"
    "$REF/venv/bin/pip" install -q torch==2.13.0
    "$REF/venv/bin/pip" install -q transformers==4.45.2 "huggingface_hub<1.0" "datasets<4" sentencepiece accelerate
  fi
  # 3. Models (llmp's venv: transformers 5). SmolLM2-135M from llmp's built-in GGUF, fp32;
  #    random TinyLlama-1.1B shape, fp32 and bf16.
  mkdir -p "$BENCH/ref_results"
  if [ ! -f "$BENCH/smollm2-hf/model.safetensors" ]; then
    $LOCK "$LLMP_VENV/bin/python" -c "
from llmp import load_model
m, t = load_model('smollm2-135m')
m.save_pretrained('$BENCH/smollm2-hf'); t.save_pretrained('$BENCH/smollm2-hf')"
  fi
  for dt in fp32:float32 bf16:bfloat16; do
    [ -f "$BENCH/tl-${dt%%:*}/model.safetensors" ] || \
      $LOCK "$LLMP_VENV/bin/python" "$MAIN/bench/make_model.py" --shape tinyllama-1.1b --dtype "${dt##*:}" --output "$BENCH/tl-${dt%%:*}"
  done
  # 4. transformers-4.x views of those folders (symlinked weights; the originals untouched).
  for d in smollm2-hf tl-fp32 tl-bf16; do
    "$REF/venv/bin/python" "$HERE/ref_model_dir.py" "$BENCH/$d" "$BENCH/ref-models/$d"
  done
  # 5. Calibration ids exactly as llmp's bench/prune.py makes them (c4, 10 x 64, seed 0).
  [ -f "$BENCH/calib_smollm2_10x64.pt" ] || $LOCK "$LLMP_VENV/bin/python" "$HERE/make_calib.py" "$BENCH/smollm2-hf" "$BENCH/calib_smollm2_10x64.pt"
  [ -f "$BENCH/calib_tl_10x64.pt" ] || $LOCK "$LLMP_VENV/bin/python" "$HERE/make_calib.py" "$BENCH/tl-fp32" "$BENCH/calib_tl_10x64.pt"
}

# name -> model dir, calibration, ratio, layer start, layer end (end exclusive: range(start, end))
config() {
  case "$1" in
    smollm2) echo "$BENCH/ref-models/smollm2-hf $BENCH/calib_smollm2_10x64.pt 0.3333 4 26 float32" ;;
    tl-fp32) echo "$BENCH/ref-models/tl-fp32 $BENCH/calib_tl_10x64.pt 0.25 4 18 float32" ;;
    tl-bf16) echo "$BENCH/ref-models/tl-bf16 $BENCH/calib_tl_10x64.pt 0.25 4 18 bfloat16" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

run_one() {  # name repeat
  read -r model calib ratio start end dtype <<< "$(config "$1")"
  local out="${RESULTS:-$BENCH/ref_results}/$1_run$2"
  mkdir -p "$(dirname "$out")"
  local cmd=(python llama3.py --base_model "$model" --device cpu --eval_device cpu --dtype "$dtype"
    --pruning_ratio "$ratio" --block_wise
    --block_attention_layer_start "$start" --block_attention_layer_end "$end"
    --block_mlp_layer_start "$start" --block_mlp_layer_end "$end"
    --pruner_type taylor --taylor param_first --grouping_strategy sum --num_examples 10
    --calibration "$calib" --save_ckpt_log_name "bench_$1" --bench_json "$out.json")
  echo "${cmd[*]}" > "$out.cmd"
  echo "[$1 #$2] ${cmd[*]}"
  (cd "$REF/LLM-Pruner" && PATH="$REF/venv/bin:$PATH" $LOCK timeout "${REF_TIMEOUT:-0}" "${cmd[@]}") > "$out.log" 2>&1
  tail -n 1 "$out.json"
}

case "$STAGE" in
  setup) setup ;;
  run) for r in $RUNS; do for i in $(seq "$FROM" "$((FROM + REPEATS - 1))"); do run_one "$r" "$i"; done; done ;;
  all) setup; for r in $RUNS; do for i in $(seq "$FROM" "$((FROM + REPEATS - 1))"); do run_one "$r" "$i"; done; done ;;
esac
"$REF/venv/bin/python" "$HERE/summarize.py" "${RESULTS:-$BENCH/ref_results}"
