#!/usr/bin/env bash
# One sitting, one job at a time (flock): LLM-Pruner and llmp on the same models, structures and
# calibration tokens, then llmp's own settings. JSON results go to $BENCH/sitting/.
#
#   bash bench/reference/side_by_side.sh      (after run_reference.sh STAGE=setup)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MAIN=$(cd "$HERE/../.." && pwd)
BENCH=${BENCH:-$(pwd)/bench/work}
OUT=$BENCH/sitting
PY=$MAIN/.venv/bin/python
LOCK="flock "${TMPDIR:-/tmp}/bench.lock""
mkdir -p "$OUT"
paper=(--calibration c4 --num-samples 10 --seq-len 64 --no-ppl --attention kv --criterion taylor)

# 1. The paper's structures (one KV group of three / four, a third / a quarter of MLP channels),
#    the two tools taking turns: a shared machine's speed drifts by 10-20% within minutes.
for i in 1 2 3; do
  FROM=$i STAGE=run RUNS=smollm2 REPEATS=1 bash "$HERE/run_reference.sh"
  $LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/smollm2-hf" "${paper[@]}" --ratio 0.192932048 --layers 4:26 > "$OUT/llmp_smollm2_$i.json"
  # What an exact score costs at least: plain autograd once in a fresh process, the products alone.
  $LOCK "$PY" "$HERE/autograd_floor.py" "$BENCH/smollm2-hf" "$BENCH/calib_smollm2_10x64.pt" --layers 4:26 \
    --repeats 1 > "$OUT/floor_smollm2_$i.json"
done
for i in 1 2; do
  FROM=$i STAGE=run RUNS=tl-fp32 REPEATS=1 bash "$HERE/run_reference.sh"
  $LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/tl-fp32" "${paper[@]}" --ratio 0.14012172 --layers 4:18 > "$OUT/llmp_tl-fp32_$i.json"
done
# bf16: LLM-Pruner once (it may not finish on a CPU without bf16 units; the sitting goes on), llmp twice.
REF_TIMEOUT=900 STAGE=run RUNS=tl-bf16 REPEATS=1 bash "$HERE/run_reference.sh" || echo "LLM-Pruner bf16 did not finish" >&2
for i in 1 2; do
  $LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/tl-bf16" "${paper[@]}" --ratio 0.14012172 --layers 4:18 > "$OUT/llmp_tl-bf16_$i.json"
done

# 2. A bf16 model pruned by 20% and saved (output size against the input's), peak RSS of the command.
$LOCK /usr/bin/time -f '{"wall_s": %e, "max_rss_kb": %M}' -o "$OUT/cli_tl-bf16.time" \
  "$MAIN/.venv/bin/llmp" prune --model "$BENCH/tl-bf16" --ratio 0.2 --criterion taylor --samples 0 \
  --output "$BENCH/tl-bf16-pruned" --overwrite > "$OUT/cli_tl-bf16.log"

# 3. The default command, without and with perplexity.
rm -rf "$BENCH/qs" "$BENCH/qs-ppl"
$LOCK /usr/bin/time -f '{"wall_s": %e, "max_rss_kb": %M}' -o "$OUT/cli_default.time" \
  "$MAIN/.venv/bin/llmp" prune --model smollm2-135m --ratio 0.2 --output "$BENCH/qs" > "$OUT/cli_default.log"
$LOCK /usr/bin/time -f '{"wall_s": %e, "max_rss_kb": %M}' -o "$OUT/cli_default_ppl.time" \
  "$MAIN/.venv/bin/llmp" prune --model smollm2-135m --ratio 0.2 --eval-data wikitext2 --output "$BENCH/qs-ppl" > "$OUT/cli_default_ppl.log"

# 4. The 1.1B shape by llmp's defaults: in memory (Taylor; flap + lstsq layer by layer) and streamed.
$LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/tl-fp32" --no-ppl --criterion taylor > "$OUT/llmp_tl-fp32_taylor_default.json"
$LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/tl-fp32" --no-ppl > "$OUT/llmp_tl-fp32_flap_default.json"
$LOCK "$PY" "$MAIN/bench/scale.py" --shape tinyllama-1.1b --folder "$BENCH/tl-fp32" --output "$BENCH/tl-fp32-streamed" > "$OUT/scale_tl-fp32.json"

# 5. SmolLM2 pruning time by llmp's old default (Taylor) and its new one (flap + lstsq, layer by layer).
for i in 1 2; do
  $LOCK "$PY" "$MAIN/bench/prune.py" --model smollm2-135m --no-ppl --criterion taylor > "$OUT/llmp_smollm2_taylor_default_$i.json"
  $LOCK "$PY" "$MAIN/bench/prune.py" --model smollm2-135m --no-ppl > "$OUT/llmp_smollm2_flap_default_$i.json"
  $LOCK "$PY" "$MAIN/bench/prune.py" --model smollm2-135m --no-ppl --compensate bias > "$OUT/llmp_smollm2_flap_bias_$i.json"
done
# 6. Both tools with tcmalloc preloaded instead of glibc's malloc (where it is installed:
#    apt-get install libtcmalloc-minimal4), once each on the paper runs.
TCMALLOC=${TCMALLOC:-/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4}
if [ -f "$TCMALLOC" ]; then
  mkdir -p "$OUT/tcmalloc"
  RESULTS=$OUT/tcmalloc LD_PRELOAD=$TCMALLOC STAGE=run RUNS="smollm2 tl-fp32 tl-bf16" REPEATS=1 REF_TIMEOUT=900 \
    bash "$HERE/run_reference.sh" || echo "LLM-Pruner with tcmalloc did not finish" >&2
  LD_PRELOAD=$TCMALLOC $LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/smollm2-hf" "${paper[@]}" --ratio 0.192932048 --layers 4:26 > "$OUT/tcmalloc/llmp_smollm2.json"
  LD_PRELOAD=$TCMALLOC $LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/tl-fp32" "${paper[@]}" --ratio 0.14012172 --layers 4:18 > "$OUT/tcmalloc/llmp_tl-fp32.json"
  LD_PRELOAD=$TCMALLOC $LOCK "$PY" "$MAIN/bench/prune.py" --model "$BENCH/tl-bf16" "${paper[@]}" --ratio 0.14012172 --layers 4:18 > "$OUT/tcmalloc/llmp_tl-bf16.json"
  rm -rf "$BENCH/qs-tc"
  LD_PRELOAD=$TCMALLOC $LOCK /usr/bin/time -f '{"wall_s": %e, "max_rss_kb": %M}' -o "$OUT/tcmalloc/cli_default.time" \
    "$MAIN/.venv/bin/llmp" prune --model smollm2-135m --ratio 0.2 --output "$BENCH/qs-tc" > "$OUT/tcmalloc/cli_default.log"
fi
echo done
