#!/usr/bin/env bash
# One command for a GPU machine: build in place with that machine's torch, run the test suite
# (CUDA tests included), run every benchmark, and write the logs and one JSON of all benchmark
# results into a folder: bench/gpu_check.sh [OUT_DIR]   (default: $OUT when set, else
# bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
export LUSSCORE_BUILD_CUDA=1 PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
status=0

# --no-deps: the GPU machine may have no package index; it brings its own torch.
python -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { echo "build failed: see $out/build.log"; tail -40 "$out/build.log"; exit 1; }
python -c "import json, lusscore; print(json.dumps(lusscore.build_info()))" | tee "$out/build_info.json"

python -m pytest python_tests -q -rs 2>&1 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

mkdir -p "$out/bench_parts"
for script in bench/bench_*.py; do
  name=$(basename "$script" .py)
  echo "== $name"
  python "$script" --json "$out/bench_parts/$name.json" || { echo "$name failed"; status=1; }
done
# Issue #7: every stage of a whole `luss run synthetic_gpu`, fused vs reference ops (the
# default run of bench_pipeline.py above gave the pretrain/attention images/s and memory).
# LUSS_SKIP_STAGES=1 skips it (two full runs: minutes each on an H100). The dataset and runs
# stay in a temporary folder (too large to keep with the results).
if [ "${LUSS_SKIP_STAGES:-0}" != "1" ]; then
  echo "== bench_pipeline --stages"
  python bench/bench_pipeline.py --stages --work "${TMPDIR:-/tmp}/lusscore_pipeline_runs" \
    --json "$out/bench_parts/bench_pipeline_stages.json" || { echo "bench_pipeline --stages failed"; status=1; }
fi
python bench/common.py merge "$out/bench_parts" "$out/bench_results.json" && rm -rf "$out/bench_parts"
exit $status
