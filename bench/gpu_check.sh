#!/usr/bin/env bash
# One command for a GPU machine: build in place with that machine's torch, run the tests and
# the benchmarks, and write their logs, one JSON of all benchmark results and its markdown table
# (bench/report.py) into a folder.
#
#   bench/gpu_check.sh [--quick | --full] [OUT_DIR]     (OUT_DIR: $OUT when set, else bench/results)
#
# --quick (the default): built for the visible GPU's arch only, the CUDA tests only (CI runs
#   the CPU ones; LUSSCORE_REQUIRE_CUDA=1 makes a CUDA test that would skip an error), each op
#   benchmark at one representative size, no whole-run benchmark: sized for a lent machine's
#   time (one H200, 16 cores: build and tests in a few minutes).
# --full: every test, every benchmark at every size, the whole-run stage benchmark
#   (bench_pipeline --stages), and compute-sanitizer memcheck and racecheck on the ops' CUDA
#   tests.
# At most 8 files land in OUT_DIR, none in a sub-folder: build.log, build_info.json,
# tests.log, bench.log, bench_results.json, bench_table.md (+ memcheck.log, racecheck.log with
# --full).
set -uo pipefail
cd "$(dirname "$0")/.."
profile=quick
case "${1:-}" in
  --quick) shift ;;
  --full) profile=full; shift ;;
  -*) echo "usage: bench/gpu_check.sh [--quick | --full] [OUT_DIR]"; exit 2 ;;
esac
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
export LUSSCORE_BUILD_CUDA=1 LUSSCORE_REQUIRE_CUDA=1 PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the visible GPU's arch: one arch, the fastest build
  TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") \
    || { echo "no usable GPU: torch.cuda.get_device_capability() failed"; exit 1; }
  export TORCH_CUDA_ARCH_LIST
fi
status=0
start=$(date +%s)

# --no-deps: the GPU machine may have no package index; it brings its own torch.
python -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { echo "build failed: see $out/build.log"; tail -40 "$out/build.log"; exit 1; }
python -c "import json, lusscore; print(json.dumps(lusscore.build_info()))" | tee "$out/build_info.json"
echo "build: $(( $(date +%s) - start )) s"

tests=(python_tests -q -rs)
[ "$profile" = quick ] && tests+=(-m cuda)
python -m pytest "${tests[@]}" 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "build + tests: $(( $(date +%s) - start )) s"

parts=$(mktemp -d)
for script in bench/bench_*.py; do
  name=$(basename "$script" .py)
  args=(--json "$parts/$name.json")
  if [ "$profile" = quick ]; then
    [ "$name" = bench_synthetic ] && continue  # CPU data generation: CI's machines measure it
    args+=(--quick)
  fi
  echo "== $name ${args[*]:2}" | tee -a "$out/bench.log"
  python "$script" "${args[@]}" 2>&1 | tee -a "$out/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$name failed"; status=1; }
done
if [ "$profile" = full ]; then
  # Every stage of a whole `luss run synthetic_gpu`, fused vs reference ops; the runs stay in a
  # temporary folder (too large to keep with the results).
  python bench/bench_pipeline.py --stages --work "${TMPDIR:-/tmp}/lusscore_pipeline_runs" \
    --json "$parts/bench_pipeline_stages.json" >>"$out/bench.log" 2>&1 \
    || { echo "bench_pipeline --stages failed"; status=1; }
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 python -m pytest -q -m cuda \
      python_tests/test_attention_pool.py python_tests/test_overlap_gather.py \
      python_tests/test_kmeans.py python_tests/test_seg_metrics.py python_tests/test_label_codec.py \
      python_tests/test_hp_loss.py \
      >"$out/$tool.log" 2>&1 || { echo "compute-sanitizer $tool found errors: see $out/$tool.log"; status=1; }
  done
fi
python bench/common.py merge "$parts" "$out/bench_results.json"
rm -rf "$parts"
python bench/report.py "$out/bench_results.json" --out "$out/bench_table.md" \
  || { echo "bench/report.py could not read the results"; status=1; }
echo "gpu_check $profile: $(( $(date +%s) - start )) s, status $status"
exit $status
