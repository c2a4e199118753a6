#!/usr/bin/env bash
# The whole GPU check-and-benchmark, in steps that each fit a 10-minute slot:
#
#   tools/gpu_session.sh test     the test suite, compiled, at real sizes         (~4 min H100)
#   tools/gpu_session.sh tune     re-tune this GPU's tile table (TUNE_BUDGET_S)   (~8 min)
#   tools/gpu_session.sh bench    the main job, uniform then Zipf(1.2) routing,
#                                 and the measured gate+up fusion saving          (~5 min)
#   tools/gpu_session.sh pack     tar everything under $OUT into $OUT/session.tar.gz
#                                 (for a runner that returns only a few files)
#
# Several steps may be given in one call. Results go to $OUT (default
# benchmarks/results): the table `<gpu>.json` to copy into moe_ops/tile_tables/, its
# tune log, the benchmark's JSON/markdown/PNG, and a log per step.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'tools/gpu_session.sh needs a GPU (CUDA or ROCm)')"
out_given="${OUT:+yes}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import moe_ops" 2>/dev/null || pip install --quiet --no-deps --no-build-isolation -e .
gpu_slug=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>/dev/null || true

for step in "$@"; do
  case "$step" in
    test)
      python -m pytest -q -p no:cacheprovider tests > "$OUT/test.log" 2>&1 \
        || echo "TESTS FAILED (see test.log)"
      tail -40 "$OUT/test.log" ;;
    tune)
      table="moe_ops/tile_tables/$gpu_slug.json"
      python -m tools.tune --budget-s "${TUNE_BUDGET_S:-450}" --out "$table" 2>&1 \
        | tee "$OUT/tune.log" | grep -E "chose|variant|budget|cells tuned"
      cp "$table" "${table%.json}.tunelog.jsonl" "$OUT/" ;;
    bench)
      python benchmarks/bench_moe.py --out "$OUT" 2>&1 | tee "$OUT/bench_uniform.log" | tail -5
      python benchmarks/bench_moe.py --routing zipf --zipf-s 1.2 --out "$OUT" 2>&1 \
        | tee "$OUT/bench_zipf.log" | tail -5
      python -m tools.roofline --model mixtral-8x7b qwen3-30b-a3b --tokens 1 32 512 8192 \
        --measure-fusion 2>&1 | tee "$OUT/fusion.log" | tail -30 ;;
    pack)
      [ "$out_given" = yes ] || { echo "pack empties \$OUT: set OUT to a scratch folder" >&2; exit 2; }
      tar czf /tmp/session.tar.gz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/session.tar.gz "$OUT/" ;;
    *)
      echo "unknown step '$step' (test, tune, bench, pack)" >&2; exit 2 ;;
  esac
done
