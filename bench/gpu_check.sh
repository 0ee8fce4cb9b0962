#!/usr/bin/env bash
# GPU readiness check (`make gpu-check`): every GPU test and the GPU benches, < 8 minutes, on a bare offline
# CUDA machine whose python3 holds torch / triton / transformers (seen: torch 2.11, triton 3.6, transformers 5.17,
# no faiss). Writes bench/results/gpu-*.json (+ logs) under $OUT/ as well when $OUT is set.
#
#   bash bench/gpu_check.sh            # from the repository root
#
# kvrecall is not installed there: a shadow package tree (symlinks) maps kvrecall.<folder> onto the repo's
# top-level folders, exactly as pyproject's package-dir does. pytest is used when importable; otherwise it is
# installed from wheels in $KVRECALL_WHEELS (default bench/wheels) with pip --no-index, else the tests are skipped
# and said so. Each step has its own time limit so one slow step cannot eat the others' time.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
RESULTS=$REPO/bench/results
mkdir -p "$RESULTS"
SHADOW=$(mktemp -d)
mkdir -p "$SHADOW/kvrecall"
for f in "$REPO"/kvrecall/*; do ln -s "$f" "$SHADOW/kvrecall/$(basename "$f")"; done
for pkg in encoder kvstore retriever kernels; do ln -sfn "$REPO/$pkg" "$SHADOW/kvrecall/$pkg"; done
export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
export KVRECALL_NATIVE=0            # the codec's C extension is not built on this machine
# the small shared assets (stories260K, fixture-hd64, texts) travel inside the tree as ./shared (make gpu-bundle):
# the tests that need them run there instead of skipping
if [ -z "${KVRECALL_SHARED:-}" ] && [ -d "$REPO/shared/models" ]; then export KVRECALL_SHARED=$REPO/shared; fi
status=0
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$RESULTS/gpu-$name.log" 2>&1
  local rc=$?
  tail -n 25 "$RESULTS/gpu-$name.log"
  echo "== $name: rc=$rc in $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}

$PY - <<'PY' > "$RESULTS/gpu-env.json"
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
for mod in ("triton", "transformers", "faiss", "pytest"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:  # noqa: BLE001
        info[mod] = f"missing ({type(exc).__name__})"
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name(0)
print(json.dumps(info, indent=1))
PY
cat "$RESULTS/gpu-env.json"

missing=""
for mod in pytest hypothesis; do $PY -c "import $mod" 2>/dev/null || missing="$missing $mod"; done
if [ -n "$missing" ]; then  # offline: from wheels carried in the tree (make gpu-bundle puts them in shared/wheels)
  WHEELS=${KVRECALL_WHEELS:-$REPO/bench/wheels}
  [ -d "$WHEELS" ] || WHEELS=$REPO/shared/wheels
  [ -d "$WHEELS" ] && $PY -m pip install --no-index --find-links "$WHEELS" --target "$SHADOW/site" $missing \
      > "$RESULTS/gpu-pip.log" 2>&1; export PYTHONPATH="$PYTHONPATH:$SHADOW/site"
fi
if $PY -c "import pytest" 2>/dev/null; then
  # kernels (their CUDA tests run here, interpreter cases too) and the retrieval cache's Triton path
  step tests 300 $PY -m pytest --import-mode=importlib -q -x -p no:cacheprovider \
      tests/test_kernels_score_topk.py tests/test_kernels_sparse_attention.py tests/test_kernels_fetch.py \
      tests/test_kernels_rans_decode.py tests/test_retriever_fast_scoring.py tests/test_retrieval_cache.py \
      --junitxml "$RESULTS/gpu-tests.xml"
else
  echo "== tests: SKIPPED (no pytest and no wheels in ${KVRECALL_WHEELS:-bench/wheels or shared/wheels})" | tee "$RESULTS/gpu-tests.log"
  status=1
fi
step kernels 150 $PY bench/kernels.py --quick --json "$RESULTS/gpu-kernels.json"
step decode 180 $PY bench/decode.py --gpu --json "$RESULTS/gpu-decode.json"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp "$RESULTS"/gpu-* "$OUT/results/" 2>/dev/null; fi
rm -rf "$SHADOW"
exit $status
