#!/usr/bin/env bash
# One script for a lent GPU machine (../shared/BENCHMARKING.md): install what the image lacks, build csrc/ for
# sm_90, run the whole test suite, run the whole bench, print the summary table last. Fits in ~9 minutes.
#
#   bash benchmarks/run_gpu.sh                 # everything
#   bash benchmarks/run_gpu.sh --no-tests      # build + bench only
#   bash benchmarks/run_gpu.sh --append-wheels # only append the carried .gpuwheels/part* to /var/tmp/gw/all.tar
#                                              # (for wheel parts carried over several calls to a warm machine)
#   bash benchmarks/run_gpu.sh -- --only mae_step ceilings   # extra arguments after -- go to dermfast.bench
#
# From the device tool: run(command="bash benchmarks/run_gpu.sh", timeout_s=600, carry=[".gpuwheels"]) where the
# wheel parts fit in one call (64 MiB), else without them (DALI rows are then reported absent). Everything worth
# keeping lands in $OUT (results CSV + markdown, logs): the machine keeps nothing.
#
# Time budget (seconds, override by environment): TEST_TIMEOUT=150 for pytest, BENCH_TIMEOUT=300 for the bench
# (the harness stops starting modules at BENCH_BUDGET=200 and writes what it measured; `timeout` sends SIGTERM,
# which the harness also turns into a written result), DERMFAST_BENCH_MAE_BUDGET_S=150 for the MAE step cases.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/run_gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
BENCH_BUDGET=${BENCH_BUDGET:-200}
export DERMFAST_BENCH_MAE_BUDGET_S=${DERMFAST_BENCH_MAE_BUDGET_S:-150}
t0=$(date +%s)
stamp() { echo "run_gpu: [$(( $(date +%s) - t0 )) s] $*"; }

run_tests=1; append_only=0; bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) run_tests=0 ;;
    --append-wheels) append_only=1 ;;
    --) shift; bench_args=("$@"); break ;;
    *) echo "run_gpu: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

# 1. wheels the image lacks (DALI, diffusers): parts of one tar, appended in order, possibly over several calls
GW=${GW_DIR:-/var/tmp/gw}
mkdir -p "$GW"
if compgen -G ".gpuwheels/part*/chunk.*" > /dev/null; then
  for part in $(ls -d .gpuwheels/part* | sort -V); do
    name=$(basename "$part")
    if grep -qx "$name" "$GW/parts.done" 2>/dev/null; then continue; fi
    cat "$part"/chunk.* >> "$GW/all.tar" && echo "$name" >> "$GW/parts.done"
    stamp "appended $name"
  done
fi
[ "$append_only" = 1 ] && { stamp "wheel parts appended: $(tr '\n' ' ' < "$GW/parts.done" 2>/dev/null)"; exit 0; }
if [ -s "$GW/all.tar" ]; then
  if tar -tf "$GW/all.tar" > /dev/null 2>&1; then
    mkdir -p "$GW/w" && tar -C "$GW/w" -xf "$GW/all.tar"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /var/tmp/site "$GW"/w/*.whl \
      && export PYTHONPATH=/var/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
      && stamp "installed $(ls "$GW"/w/*.whl | wc -l) wheels into /var/tmp/site"
  else
    stamp "wheel tar incomplete (parts so far: $(tr '\n' ' ' < "$GW/parts.done")): DALI / diffusers stay absent"
  fi
else
  stamp "no wheel parts carried: DALI / diffusers rows will be reported absent"
fi

# 2. dermfast itself, csrc/ built for sm_90 (fails loudly: a build error is a result too)
stamp "building (DERMFAST_CUDA_ARCHS=90)"
if ! DERMFAST_BUILD_CUDA=1 DERMFAST_CUDA_ARCHS=90 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
     $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  stamp "BUILD FAILED (log in build.log); continuing without dermfast._C"
  DERMFAST_BUILD_CUDA=0 $PY -m pip install -q --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1 \
    || { stamp "install without the extension failed too"; exit 1; }
fi
$PY -m dermfast.info > "$OUT/info.log" 2>&1; cat "$OUT/info.log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >> "$OUT/info.log" 2>&1

# 3. the whole test suite (GPU tests included), time-boxed
test_rc=skipped
if [ "$run_tests" = 1 ]; then
  stamp "tests (timeout ${TEST_TIMEOUT} s)"
  timeout -s INT "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider --durations=15 tests \
    > "$OUT/tests.log" 2>&1
  test_rc=$?
  tail -25 "$OUT/tests.log"
  [ "$test_rc" = 124 ] && stamp "tests hit the ${TEST_TIMEOUT} s limit (see tests.log for how far they got)"
fi

# 4. the whole bench: ceilings first, then every benchmarks/bench_*.py; --out benchmarks/results: GPU results are
#    committed (dermfast.bench writes under runs/bench/ by default, so an ordinary run leaves the checkout clean)
stamp "bench (budget ${BENCH_BUDGET} s, hard limit ${BENCH_TIMEOUT} s)"
timeout -s TERM -k 20 "$BENCH_TIMEOUT" $PY -m dermfast.bench --budget-s "$BENCH_BUDGET" --out benchmarks/results \
  "${bench_args[@]}" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
for f in benchmarks/results/*-"$(date +%F)".csv benchmarks/results/*-"$(date +%F)".md; do
  [ -f "$f" ] && cp "$f" "$OUT/"
done
stamp "done: tests rc=$test_rc, bench rc=$bench_rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
# the table, then the short summaries (MAE step: img/s, MFU, breakdown) last; bench.log and the .md have it all
grep -qE '^bench +workload +shape' "$OUT/bench.log" && awk 'p || /^bench +workload +shape/{p=1} p' "$OUT/bench.log" \
  || tail -60 "$OUT/bench.log"
[ "$bench_rc" = 0 ] || tail -40 "$OUT/bench.log" | grep -iE "error|traceback|stopped" | tail -15
exit "$bench_rc"
