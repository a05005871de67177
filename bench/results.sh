#!/bin/sh
# Every run behind bench/RESULTS.md, one after the other, each output kept in OUT
# (default bench/results-out/). From the repository root, after `make install loadgen`:
#     sh bench/results.sh [OUT]
# About 11 minutes on the 2-core development machine. Run it on a quiet machine:
# the figures that matter are the ratios within each run.
set -eu
OUT=${1:-bench/results-out}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
run() {  # run NAME COMMAND...: print and keep its output
    name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt"
}
run e2e-64-fbc      $PY -m bench.e2e --jobs 100000 --rounds 3 --only compiled,pure,proxy,proxy-fbc
run e2e-256-req     $PY -m bench.e2e --jobs 100000 --rounds 3 --window 256 --protocol req --only compiled,proxy
run scaling         $PY -m bench.scaling --json "$OUT/scaling.json"
run payload-inproc  $PY -m pytest bench/test_payload.py --benchmark-only -q -p no:cacheprovider
run depth           $PY -m pytest bench/test_depth.py --benchmark-only -q -p no:cacheprovider \
                        -k compiled --benchmark-json "$OUT/depth.json"
run depth-table     $PY -m bench.depth_table "$OUT/depth.json"
run memory          $PY -m bench.memory --compare
run manycore        $PY -m bench.manycore
