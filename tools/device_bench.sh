#!/usr/bin/env bash
# The benchmark suite (issue #8) on a GPU machine whose tree is already built in place (for
# example by tools/device_sparsek.sh earlier on the same machine): nothing is built here. The
# suite runs in parts, each well inside a 9-minute call:
#
#   tools/device_bench.sh PART [PART ...]
#
#   main1           seed000, seed003, sparsek-seed003: fwd and fwd+bwd, every peer       ~5.5 min
#   main2           long32k, sparsek-long32k, blocksparse80: likewise                    ~6.5 min
#   sweeps          long, decode, density groups (fwd; a few fwd+bwd), ours + the
#                   strongest peers, then the plots                                      ~5.5 min
#   sparsek-sweeps  SparseK k_select x window sweeps of both shapes, cut to 3 x 3
#                   points each (fwd; two fwd+bwd), then the plots                       ~5 min
#   profile         our forward of sparsek-seed003 and of seed003 under ncu              ~3 min
#   main            main1 then main2 (for a machine without a per-call limit); all: every part
#
# In order of importance: main1, main2, sparsek-sweeps, sweeps, profile. Every part ends with
# `python -m benchmarks.report` (the README's tables: the headline and decoding presets), the
# plots, and $OUT/results.tgz (benchmarks/results and README.md); unpack each part's
# results.tgz into the tree before the next part, so that the last report covers all of them.
# $OUT (default ./device_out) also gets logs-PART.tgz (one log per step) and summary.txt
# (per step its exit status and seconds, then the records), printed last. BENCHMARK_COMMIT=<sha> names the commit in the records when
# the tree has no .git. A dry run of the script's plumbing on a CPU:
#   REQUIRE_GPU=0 EXTRA_ARGS="--scale-down 32 --iters 2" tools/device_bench.sh sweeps
# (EXTRA_ARGS goes to the end of every `python -m benchmarks` step).
#
# Each `python -m benchmarks` step runs under `timeout` (its limit beside it) in its own
# process, one problem or one group per process: JAX's pool and torch's cache, which never
# shrink while a process lives, start empty for each, and every record is saved as soon as it
# is measured (a step cut by its limit keeps what it finished). The implementations run in the
# order ours, jax's, torch's, so torch.flex (the slowest to compile) is what a cut loses first.
# A part's limits add up to at most 8.5 minutes.
#
# Time estimates (H100; seconds). A process start (python, jax, torch, CUDA context) ~10.
# JAX compiles ~1-3 per implementation and pass; a float32 reference ~1-3 per compile (the
# soft SparseK backward compiles once per query block: ~10 blocks at long32k); torch.compile
# of FlexAttention ~15 (forward) + ~25 (backward) + ~10 (its block mask) per new shape or
# mask, a few seconds when inductor's cache already holds the graph. Timing itself is small:
# (3 + iters) calls of at least 10 ms each.
#   main1: sparsek-seed003 ~130 (7 impls incl. the window stand-in, 6 references, flex 50),
#          seed003 ~100, seed000 ~80; + 3 starts + report ~40                      = ~350
#   main2: sparsek-long32k ~170 (blocked backward references ~70, flex 50), long32k ~90,
#          blocksparse80 ~100; + starts and report ~40                                = ~400
#   sweeps (--iters 10): long 5 x ~11 + 10 (128k: ours and cuDNN ~125 ms a call) ~75,
#          density 7 x ~18 + a cold flex compile ~25 + 10 ~160, decode (dense and SparseK
#          presets) ~60, the SparseK cache decode ~20, fwd+bwd of long16k and long64k ~45,
#          plots and report ~15                                                       = ~380
#   sparsek-sweeps (--iters 10): 9 presets per shape x ~13 (ours; cuDNN causal and the window
#          stand-in; 3 forward references) + 10 per shape ~250, two fwd+bwd points ~50,
#          plots and report ~15                                                       = ~310
#          (torch.flex is left out of the sweeps' SparseK points: its mask changes with the
#          window, a cold compile of ~30 s each; it runs at the headline points in main1/2.
#          The cut keeps k_select 64, 256, 1024 and windows 128, 256, 512 of presets.py's
#          5 x 3, the points the speedup_kselect plot needs.)
#   profile: ncu replays each kernel of one call (46 launches for sparsek-seed003's selection
#          chunks, gather and window part; 1 for seed003): ~70 + ~50; + report         = ~130
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/device_bench.XXXXXX")
PY=${PYTHON:-python3}

if [ $# -eq 0 ]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
parts=()
for arg in "$@"; do
  case $arg in
    main) parts+=(main1 main2) ;;
    all) parts+=(main1 main2 sparsek-sweeps sweeps profile) ;;
    main1|main2|sweeps|sparsek-sweeps|profile) parts+=("$arg") ;;
    *) echo "unknown part $arg (main1 main2 sweeps sparsek-sweeps profile main all)"; exit 2 ;;
  esac
done

SUMMARY=""  # the current part's summary file
step() {  # step NAME SECONDS CMD...: CMD under a time limit, its output in $LOGS/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  # What a reader needs from the log: failures, skips of ours, missing references, the end.
  grep -E "failed:|no reference|Traceback|Error|RESOURCE_EXHAUSTED|out of memory|holds NaN" \
    "$LOGS/$name.log" | grep -v "^W0\|^I0" | sort | uniq -c | sort -rn | head -n 8
  tail -n "${TAIL:-3}" "$LOGS/$name.log"
  local verdict="rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="rc=$rc (cut at its limit)"
  printf '%-34s %-26s %5ds\n' "$name" "$verdict" $((SECONDS - start)) | tee -a "$SUMMARY"
}

bench() {  # bench NAME SECONDS ARGS...: python -m benchmarks ARGS
  local name=$1 limit=$2
  shift 2
  # shellcheck disable=SC2086  # EXTRA_ARGS: words on purpose
  step "$name" "$limit" "$PY" -m benchmarks "$@" ${EXTRA_ARGS:-}
}

finish() {  # the README tables, the plots, the archive and the summary of the part
  local part=$1
  step report 20 "$PY" -m benchmarks.report
  step plots 30 "$PY" -m benchmarks.plots
  tar czf "$OUT/results.tgz" benchmarks/results README.md
  tar czf "$OUT/logs-$part.tgz" -C "$LOGS" .
  {
    echo "-- records in the files this part wrote:"
    "$PY" - "$LOGS/.start" <<'EOF'
import json, os, sys
from pathlib import Path
from benchmarks import report
since = os.path.getmtime(sys.argv[1])
print(report.table([r for path in sorted(Path("benchmarks/results").glob("*/*.json"))
                    if path.stat().st_mtime >= since for r in json.loads(path.read_text())]))
EOF
    echo "-- part $part: $((SECONDS - PART_START)) s"
  } >> "$SUMMARY"
  cat "$SUMMARY" >> "$OUT/summary.txt"
  rm -f "$LOGS"/*.log "$SUMMARY"
}

preflight() {
  command -v nvidia-smi > /dev/null &&
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
  "$PY" - <<'EOF' || { echo "preflight failed: no GPU for jax or no CUDA build of jax_sparsek"; exit 1; }
import os, shutil, sys
from importlib.util import find_spec
import jax
from jax_sparsek import _ffi
cuda = sorted(n for n, p in _ffi._TARGETS.items() if "cuda" in p)
print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; jax_sparsek CUDA targets: "
      f"{len(cuda)}; torch: {find_spec('torch') is not None}; "
      f"matplotlib: {find_spec('matplotlib') is not None}; ncu: {shutil.which('ncu')}")
gpu = jax.default_backend() == "gpu" and cuda
sys.exit(0 if gpu or os.environ.get("REQUIRE_GPU") == "0" else 1)
EOF
}

# ncu ships with the CUDA toolkit, not always on PATH.
if ! command -v ncu > /dev/null; then
  for dir in /usr/local/cuda/bin /opt/nvidia/nsight-compute/*; do
    [ -x "$dir/ncu" ] && { PATH=$PATH:$dir; break; }
  done
fi

preflight
: > "$OUT/summary.txt"
for part in "${parts[@]}"; do
  SUMMARY="$LOGS/summary-$part.txt"
  echo "== part $part" | tee "$SUMMARY"
  touch "$LOGS/.start"
  PART_START=$SECONDS
  case $part in
    main1)  # BENCHMARKS.md presets, most at stake first; every peer, both passes, 20 samples
      bench sparsek-seed003 190 --preset sparsek-seed003
      bench seed003 150 --preset seed003
      bench seed000 120 --preset seed000
      ;;
    main2)
      bench sparsek-long32k 210 --preset sparsek-long32k
      bench long32k 120 --preset long32k
      bench blocksparse80 120 --preset blocksparse80
      ;;
    sweeps)  # forward sweeps: ours and the strongest peers of each
      # long32k is main2's (all peers, 20 samples): not measured again here.
      bench long 110 --preset long8k long16k long64k long128k --passes fwd --iters 10 \
        --impl jax_sparsek "jax.nn[cudnn]" "torch.sdpa[cudnn]"
      bench density 165 --preset density --passes fwd --iters 10 \
        --impl jax_sparsek "jax.nn[cudnn]" torch.flex
      bench decode 75 --preset decode --passes fwd --iters 10 \
        --impl jax_sparsek "jax.nn[cudnn]" "jax.nn[xla]" "torch.sdpa[cudnn]"
      step sparsek-cache-decode 40 "$PY" -m benchmarks.decode
      bench long-fwd-bwd 70 --preset long16k long64k --passes fwd+bwd --iters 10 \
        --impl jax_sparsek "jax.nn[cudnn]"
      ;;
    sparsek-sweeps)  # ours against cuDNN causal and cuDNN on a window of as many keys
      bench sparsek-seed003-sweep 150 --preset sparsek-seed003-k{64,256,1024}-w{128,256,512} \
        --passes fwd --iters 10 --impl jax_sparsek "jax.nn[cudnn*"
      bench sparsek-long32k-sweep 150 --preset sparsek-long32k-k{64,256,1024}-w{128,256,512} \
        --passes fwd --iters 10 --impl jax_sparsek "jax.nn[cudnn*"
      bench sparsek-sweep-fwd-bwd 90 --preset sparsek-seed003-k64-w128 sparsek-seed003-k1024-w512 \
        --passes fwd+bwd --iters 10 --impl jax_sparsek "jax.nn[cudnn*"
      ;;
    profile)  # ncu summaries to benchmarks/results/<device>/profiles/
      step profile-sparsek-seed003 240 "$PY" -m benchmarks.profile sparsek-seed003 --timeout 220
      step profile-seed003 150 "$PY" -m benchmarks.profile seed003 --timeout 130
      ;;
  esac
  finish "$part"
done
rm -rf "$LOGS"
cat "$OUT/summary.txt"
