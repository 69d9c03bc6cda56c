#!/usr/bin/env bash
# The GPU check: what only a CUDA machine can tell us, in one run of a few minutes.
#
#   bash scripts/gpu_check.sh [WORK_DIR]
#
# Stages (each under its own time limit; a stage that fails or times out does not stop the next):
#   1. the Triton kernel tests compiled natively for this GPU (tests/test_kernels_triton.py, tests/test_kernels.py,
#      tests/test_kernels_multi.py)
#   2. the kernel benchmark against the ceilings measured on this device (python -m preft_rl.reports.kernels)
#   3. the trainer's forward+backward on an 8B-shaped random Llama: PreFT LoRA (plain, shared prompt, no
#      checkpointing), all-token LoRA, PreFT LoReFT, the reference pass; plus one LoRA layer torch vs Triton
#      (scripts/gpu_train_step.py)
# then writes the report, docs/benchmarks/kernels-gpu.md (or $REPORT), with scripts/gpu_report.py.
#
# Needs python3 with torch and triton that see a GPU (transformers for stage 3); vLLM, DeepSpeed and TRL are not
# needed and preft-rl need not be installed: it is imported from this checkout. WORK_DIR (default: a new temp dir)
# receives env.txt, pytest.log, kernels.json, train_step.json and gpu_check.log. On a machine without CUDA it
# says so and exits 0. PYTHON picks the interpreter (default python3); STAGES="1 3" runs only those stages (the
# report then reads the other stages' files from WORK_DIR, if an earlier run left them there).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WORK=${1:-$(mktemp -d -t gpu_check.XXXXXX)}
REPORT=${REPORT:-$ROOT/docs/benchmarks/kernels-gpu.md}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: skipped: $PY sees no CUDA device (torch.cuda.is_available() is False, or torch is missing)."
    exit 0
fi

# preft_rl from this checkout without installing it: kernels/ and rewards/ go inside it, as pyproject.toml's
# package-dir maps them. PYTHONSAFEPATH (python -P) keeps the checkout's own preft_rl/ (which lacks them) off sys.path,
# in child processes too.
SITE=$(mktemp -d -t preft_src.XXXXXX)
cp -r "$ROOT/preft_rl" "$SITE/preft_rl"
cp -r "$ROOT/kernels" "$SITE/preft_rl/kernels"
cp -r "$ROOT/rewards" "$SITE/preft_rl/rewards"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$ROOT"
exec > >(tee "$WORK/gpu_check.log") 2>&1

stage() {  # stage NAME LIMIT_S COMMAND...: run under a time limit, report the exit status and the time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ' (timed out)')"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   commit: ${GIT_REV:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    "$PY" -c 'import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}", end="")
try:
    import transformers; print(f", transformers {transformers.__version__}")
except ImportError:
    print(", transformers missing")
p = torch.cuda.get_device_properties(0); print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")'
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

# Each test compiles its own kernel specialisations: spread them over processes when pytest-xdist is there.
PARALLEL=()
"$PY" -c 'import xdist' 2>/dev/null && PARALLEL=(-n 4)
want() { [[ " ${STAGES:-1 2 3} " == *" $1 "* ]]; }
want 1 && stage "1. kernel tests, native" 200 \
    "$PY" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" tests/test_kernels_triton.py tests/test_kernels.py tests/test_kernels_multi.py 2>&1 | tee "$WORK/pytest.log"
want 2 && stage "2. kernel benchmark" 150 "$PY" -m preft_rl.reports.kernels --json "$WORK/kernels.json"
want 3 && stage "3. training step, 8B-shaped Llama" 220 "$PY" scripts/gpu_train_step.py --json "$WORK/train_step.json"
"$PY" scripts/gpu_report.py "$WORK" "$REPORT"
echo "gpu_check: raw files in $WORK, report in $REPORT"
