#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (torch preinstalled, no internet): installs the wheels that travel
# with the tree, runs the GPU test lane, bench_attention and bench_train_step, and writes ONE markdown file.
#
#   scripts/gpu_check.sh                  # on the GPU machine, from the repo root; < 8 minutes
#   scripts/gpu_check.sh --cpu-dry-run    # the same flow at tiny sizes on CPU (tests/test_gpu_check.py runs it)
#
# Environment: WHEELS (default wheels/: *.whl made with `pip download --only-binary=:all:`, see
# docs/performance.md "Running the GPU check"), OUT (default outputs/gpu_check), PYTHON (default python).
# Each stage has its own time limit, so one slow stage cannot eat the others' time; a failed stage is recorded
# in the report and the script goes on (exit status 1 at the end if any stage failed).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; elif [[ $# -gt 0 ]]; then
  echo "usage: scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
WHEELS="${WHEELS:-wheels}"
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md"
SITE="$OUT/site-packages"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0

section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
# run_stage "title" seconds cmd...: the command's output goes into the report as a block (tables print as markdown)
run_stage() {
  local title="$1" limit="$2"; shift 2
  section "$title"
  local t0=$SECONDS log="$OUT/stage.log"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  cat "$log" >>"$REPORT"
  printf '\n_%s: exit %d in %ds (limit %ds)_\n' "$title" "$rc" $((SECONDS - t0)) "$limit" >>"$REPORT"
  if [[ $rc -ne 0 ]]; then FAILED=1; echo "[gpu_check] $title failed (exit $rc)" >&2; fi
  rm -f "$log"
}

{
  echo "# fastpost GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- mode: $([[ $DRY == 1 ]] && echo 'CPU dry run (tiny sizes; numbers say nothing about GPUs)' || echo GPU)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  fi
  echo "- python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
} >"$REPORT"

# 0. wheels -> a target dir put first on PYTHONPATH (nothing is installed into the machine's own environment)
section "0. wheels"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  # --no-deps: the wheel dir holds the whole closure minus torch (already on the machine, never re-installed)
  if $PY -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >>"$REPORT" 2>&1; then
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE" >>"$REPORT"
  else
    echo "pip install from $WHEELS failed" >>"$REPORT"; FAILED=1
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#$ROOT}"
else
  echo "no wheels in $WHEELS: using the current environment's packages" >>"$REPORT"
fi
$PY - >>"$REPORT" 2>&1 <<'EOF'
import importlib
for name in ("diffusers", "transformers", "peft", "imageio_ffmpeg", "flash_attn", "flash_attn_interface"):
    try:
        m = importlib.import_module(name)
        print(f"- {name} {getattr(m, '__version__', '')}")
    except Exception as e:
        print(f"- {name}: not installed ({type(e).__name__})")
EOF

if [[ $DRY == 1 ]]; then
  # the same stages at tiny sizes; the gpu tests skip on CPU (collected, so an import error still fails here)
  run_stage "1. GPU test lane (pytest -m gpu)" 120 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  run_stage "2. bench_attention" 120 $PY benchmarks/bench_attention.py --cpu --seqs 64 --warmup 1 --iters 1 \
    --backends sdpa math
  run_stage "3. bench_train_step" 180 $PY benchmarks/bench_train_step.py --cpu --tiny --compile-backend eager
else
  run_stage "1. GPU test lane (pytest -m gpu, bf16)" 150 $PY -m pytest -q -s -m gpu tests/test_gpu.py \
    -p no:cacheprovider
  run_stage "2. bench_attention" 90 $PY benchmarks/bench_attention.py --warmup 2 --iters 5
  run_stage "3. bench_train_step (mochi-1 width, 6 layers, 17,490 tokens)" 240 $PY benchmarks/bench_train_step.py \
    --layers 6 --warmup 2 --iters 5
fi

# 4. hook: more GPU runs append their own sections here (e.g. issue 22's 16/24 GB LoRA memory runs). Each
#    scripts/gpu_check.d/*.sh is run with DRY (1 on the CPU dry run), PY, OUT in its environment; its output
#    (markdown) becomes a section of the report; give each its own `timeout` to stay within the 8 minutes.
for hook in scripts/gpu_check.d/*.sh; do
  [[ -e "$hook" ]] || continue
  DRY=$DRY PY=$PY OUT=$OUT run_stage "4. $(basename "$hook" .sh)" 120 bash "$hook"
done

echo "[gpu_check] report: $REPORT" >&2
exit $FAILED
