#!/usr/bin/env bash
# Every benchmark on this machine's CPU, at the sizes bench/cpu_table.md uses, then that table
# (about 25 minutes on the 2-core CPU, most of it hp_loss's chunked reference and the
# torch.compile peers).
#
#   bench/cpu_table.sh [OUT_DIR]     (OUT_DIR: the runs' JSON and logs, default bench/results/cpu)
#
# Sizes: each bench's CPU defaults, except the whole-set labelling (ResNet-50 on 512 images: its
# --quick set here) and hp_loss (N = 4,096 and 8,192, where its chunked reference still runs in
# a minute). Run it on an otherwise idle machine: the peers are timed in the same runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/cpu}"
mkdir -p "$out"
status=0
run() {
  local name=$1
  shift
  echo "== $name $*"
  python "bench/$name.py" "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1 \
    || { echo "$name failed: see $out/$name.log"; status=1; }
}
run bench_kmeans --device cpu --skip-fit
run bench_pipeline --device cpu --warmup 2 --repeat 8
run bench_attention_pool --device cpu
run bench_overlap_gather --device cpu
run bench_seg_metrics --device cpu
run bench_hp_loss --device cpu --sizes 4096 8192
run bench_label --device cpu --quick
run bench_synthetic
python bench/report.py "$out" --out bench/cpu_table.md || status=1
exit $status
