#!/usr/bin/env bash
# The whole GPU check-and-benchmark, in steps that each fit a 10-minute slot:
#
#   tools/gpu_session.sh test     the test suite, compiled, at real sizes         (~4 min H100)
#                                 (TEST_ARGS: pytest arguments instead of `tests`)
#   tools/gpu_session.sh probe    grouped GEMM vs the same kernel dense vs cuBLAS
#                                 (python -m tools.gemm_probe; PROBE_ARGS)        (~2 min)
#   tools/gpu_session.sh tune     re-tune this GPU's tile table (TUNE_BUDGET_S;
#                                 TUNE_ARGS, e.g. --tokens 2048 8192), merged
#                                 into moe_ops/tile_tables/<gpu>.json              (~8 min)
#   tools/gpu_session.sh heuristic  heuristic tiles vs this GPU's table, every cell
#                                 (python -m tools.check_heuristic; TUNE_ARGS)    (~2 min)
#   tools/gpu_session.sh bench    the main job, uniform then Zipf(1.2) routing (BENCH_ARGS;
#                                 vLLM and Megablocks beside ours where installed),
#                                 and the measured gate+up fusion saving          (~5 min)
#   tools/gpu_session.sh fp8      the fp8 tests, then fp8 experts against bf16 and the fp8
#                                 anchors (python -m benchmarks.bench_fp8; FP8_ARGS) (~6 min)
#   tools/gpu_session.sh eager    whole Hugging Face models, eager, transformers' experts
#                                 vs moe_ops.patch_hf_model (benchmarks/bench_hf_eager.py;
#                                 EAGER_ARGS)                                      (~3 min)
#   tools/gpu_session.sh ep       (2+ GPUs) the expert-parallel tests, then
#                                 torchrun -m benchmarks.bench_ep (EP_ARGS)        (~8 min)
#   tools/gpu_session.sh ep_uneven  (2+ GPUs) bench_ep with uneven batches: rank 0 brings 1
#                                 token, the others T (--rank0-tokens 1; EP_UNEVEN_ARGS,
#                                 default --tokens 128 4096 --routing uniform)      (~3 min)
#   tools/gpu_session.sh ep_ce    (2+ GPUs) the nvlink dispatch two ways, in one call: SM
#                                 stores (this tree) against the copy-engine design of
#                                 commit 98a6ebd (bench_ep from a copy of it in
#                                 $EP_CE_TREE, default .ep_ce_tree, made beforehand with
#                                 `mkdir -p .ep_ce_tree && git archive 98a6ebd | tar -x
#                                 -C .ep_ce_tree` and carried to the GPU machine; EP_ARGS
#                                 for both); results under $OUT/copy_engine, $OUT/sm_stores
#   tools/gpu_session.sh ep1      (one GPU) the nvlink tests with both ranks time-sliced
#                                 on it (TRITONMOE_TEST_SHARED_GPU=1: correctness, not
#                                 speed), launches per forward (benchmarks.ep_launches,
#                                 two ranks on the GPU), then benchmarks.ep_receiver (~5 min)
#   tools/gpu_session.sh ep1_fp8  (one GPU) fp8 experts as an expert-parallel receiver: the
#                                 fp8 receive-buffer tests (crowded, landing rows), fp8 over
#                                 nvlink with both ranks time-sliced on the GPU, then
#                                 benchmarks.ep_receiver --fp8 block (~5 min)
#   tools/gpu_session.sh pack     tar everything under $OUT into $OUT/session.tar.gz
#                                 (for a runner that returns only a few files)
#
# Several steps may be given in one call; every step runs from the checkout root with
# `python -m` (or `torchrun -m`), so the checkout's moe_ops is the one imported. Results go to $OUT (default
# benchmarks/results): the table `<gpu>.json` to copy into moe_ops/tile_tables/, its
# tune log, the benchmark's JSON/markdown/PNG, and a log per step.
set -euo pipefail
cd "$(dirname "$0")/.."  # the checkout root: every step imports the checkout's moe_ops
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'tools/gpu_session.sh needs a GPU (CUDA or ROCm)')"
out_given="${OUT:+yes}"
OUT="$(realpath -m "${OUT:-benchmarks/results}")"
mkdir -p "$OUT"
# The checkout imports moe_ops.distributed through the moe_ops/distributed symlink; only a
# copy that lost it (an archive without symlinks) needs the editable install.
if ! python -c "import moe_ops.distributed" 2>/dev/null; then
  pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; exit 1; }
  python -c "import moe_ops.distributed" || exit 1
fi
gpu_slug=$(python -c "import torch; from tools.cli import slug; print(slug(torch.cuda.get_device_name()))")
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>/dev/null || true

for step in "$@"; do
  case "$step" in
    test)
      python -m pytest -q -p no:cacheprovider ${TEST_ARGS:-tests} > "$OUT/test.log" 2>&1 \
        || echo "TESTS FAILED (see test.log)"
      tail -40 "$OUT/test.log" ;;
    probe)
      python -m tools.gemm_probe --out "$OUT/gemm_probe.json" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe.log" ;;
    tune)
      # Written into $OUT after every cell (a call cut short keeps what was tuned), then
      # copied over the checkout's table for the steps after it.
      table="moe_ops/tile_tables/$gpu_slug.json"
      [ ! -f "$table" ] || cp "$table" "$OUT/"
      python -m tools.tune --budget-s "${TUNE_BUDGET_S:-450}" --out "$OUT/$gpu_slug.json" ${TUNE_ARGS:-} 2>&1 \
        | tee "$OUT/tune.log" | { grep -E "chose|variant|budget|cells tuned" || true; }
      cp "$OUT/$gpu_slug.json" "$table" ;;
    heuristic)
      python -m tools.check_heuristic --out "$OUT/$gpu_slug.json" ${TUNE_ARGS:-} 2>&1 \
        | tee "$OUT/heuristic.log" | tail -40 ;;
    bench)
      python -m benchmarks.bench_moe --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_uniform.log" | tail -5
      python -m benchmarks.bench_moe --routing zipf --zipf-s 1.2 --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/bench_zipf.log" | tail -5
      python -m benchmarks.bench_fusion --models mixtral-8x7b qwen3-30b-a3b --tokens 1 32 512 8192 \
        2>&1 | tee "$OUT/fusion.log" | tail -30 ;;
    fp8)
      python -m pytest -q -p no:cacheprovider tests/test_fp8.py > "$OUT/test_fp8.log" 2>&1 \
        || echo "FP8 TESTS FAILED (see test_fp8.log)"
      tail -15 "$OUT/test_fp8.log"
      python -m benchmarks.bench_fp8 --out "$OUT" ${FP8_ARGS:-} 2>&1 | tee "$OUT/bench_fp8.log" | tail -90 ;;
    eager)
      python -m benchmarks.bench_hf_eager --out "$OUT" ${EAGER_ARGS:-} 2>&1 | tee "$OUT/hf_eager.log" | tail -40 ;;
    ep)
      ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
      export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
      timeout "${EP_TEST_TIMEOUT_S:-300}" python -m pytest -q -p no:cacheprovider \
        tests/test_distributed.py ${EP_TEST_ARGS:-} > "$OUT/test_ep.log" 2>&1 || echo "EP TESTS FAILED (see test_ep.log)"
      tail -30 "$OUT/test_ep.log"
      timeout "${EP_BENCH_TIMEOUT_S:-420}" torchrun --nproc_per_node="$ngpu" -m benchmarks.bench_ep \
        --out "$OUT" ${EP_ARGS:-} 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*" | tee "$OUT/bench_ep.log" | tail -40 ;;
    ep_uneven)
      ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
      export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
      timeout "${EP_BENCH_TIMEOUT_S:-420}" torchrun --nproc_per_node="$ngpu" -m benchmarks.bench_ep \
        --out "$OUT" --rank0-tokens 1 ${EP_UNEVEN_ARGS:---tokens 128 4096 --routing uniform} 2>&1 \
        | grep -v "^W1\|OMP_NUM\|\*\*\*\*" | tee "$OUT/bench_ep_uneven.log" | tail -20 ;;
    ep_ce)
      ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
      export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
      tree="${EP_CE_TREE:-.ep_ce_tree}"
      [ -d "$tree/distributed" ] || { echo "no copy of commit 98a6ebd in $tree (see the header)" >&2; exit 2; }
      [ -e "$tree/moe_ops/distributed" ] || ln -s ../distributed "$tree/moe_ops/distributed"  # a copy may drop links
      for side in copy_engine sm_stores; do
        dir="$PWD"; [ "$side" = copy_engine ] && dir="$(realpath "$tree")"
        (cd "$dir" && PYTHONPATH="$dir" timeout "${EP_BENCH_TIMEOUT_S:-280}" torchrun \
          --nproc_per_node="$ngpu" -m benchmarks.bench_ep --out "$OUT/$side" ${EP_ARGS:-} 2>&1 \
          | grep -v "^W1\|OMP_NUM\|\*\*\*\*" | tee "$OUT/bench_ep_$side.log" | tail -12)
      done ;;
    ep1)
      export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
      TRITONMOE_TEST_SHARED_GPU=1 timeout "${EP_TEST_TIMEOUT_S:-300}" python -m pytest -q \
        -p no:cacheprovider tests/test_distributed.py -k "gpu and nvlink" > "$OUT/test_ep1.log" 2>&1 \
        || echo "EP TESTS (ONE GPU) FAILED (see test_ep1.log)"
      tail -5 "$OUT/test_ep1.log"
      timeout "${EP_BENCH_TIMEOUT_S:-420}" torchrun --nproc_per_node=2 -m benchmarks.ep_launches \
        --out "$OUT" 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*" | tee "$OUT/ep_launches.log" | tail -12
      python -m benchmarks.ep_receiver 2>&1 | tee "$OUT/ep_receiver.log" | grep "^\[" ;;
    ep1_fp8)
      export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1
      python -m pytest -q -p no:cacheprovider tests/test_fp8.py -k \
        "landing or crowded or receive_buffer or rows_in_use or routed" > "$OUT/test_ep1_fp8.log" 2>&1 \
        || echo "FP8 RECEIVER TESTS FAILED (see test_ep1_fp8.log)"
      TRITONMOE_TEST_SHARED_GPU=1 timeout "${EP_TEST_TIMEOUT_S:-300}" python -m pytest -q \
        -p no:cacheprovider tests/test_distributed.py -k "gpu and nvlink and fp8" \
        >> "$OUT/test_ep1_fp8.log" 2>&1 || echo "FP8 NVLINK TEST FAILED (see test_ep1_fp8.log)"
      tail -5 "$OUT/test_ep1_fp8.log"
      python -m benchmarks.ep_receiver --fp8 block --tokens 1 --peer-tokens 2048 --ab 5 2>&1 \
        | tee "$OUT/ep_receiver_fp8.log" | grep "^\[.*\] \|receiving [0-9]* rows\]" ;;
    pack)
      [ "$out_given" = yes ] || { echo "pack empties \$OUT: set OUT to a scratch folder" >&2; exit 2; }
      tar czf /tmp/session.tar.gz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/session.tar.gz "$OUT/" ;;
    *)
      echo "unknown step '$step' (test, probe, tune, heuristic, bench, fp8, eager, ep, ep_uneven, ep_ce, ep1, ep1_fp8, pack)" >&2; exit 2 ;;
  esac
done
