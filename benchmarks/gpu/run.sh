#!/usr/bin/env bash
# GPU benchmarks, all in one call, from any working directory:
#
#     bash benchmarks/gpu/run.sh            # results in $OUT (default benchmarks/results/gpu)
#     OUT=/tmp/gpu SD15_SPEED_ARGS="--repeats 5 --no-compile" bash benchmarks/gpu/run.sh
#     STEPS="clear_attention flux_clear_speed" bash benchmarks/gpu/run.sh     # only these steps
#
# The step timeouts add up to under 10 minutes (one device call): sd15_speed 180 s, clear_attention
# 120 s, flux_clear_speed 240 s; each step writes its results after every case, so a step cut short
# still leaves what it measured.
# Nothing is downloaded: the machine needs torch, diffusers and transformers already installed
# (or a .venv carried along in the repository root). Every step goes through `run_step`, which logs
# start, end, duration and exit code to $OUT/run_log.txt and the step's output to $OUT/<name>.log;
# a failing step never stops the steps after it. The script exits 1 when any step failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export OUT
LOG="$OUT/run_log.txt"
FAILED=()

log() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $*" | tee -a "$LOG"; }

# run_step NAME CMD...: run CMD, tee its output to $OUT/NAME.log, record its exit code; never aborts.
run_step() {
    local name=$1
    shift
    local start rc
    if [[ -n ${STEPS:-} && " $STEPS " != *" $name "* ]]; then
        log "SKIP  $name (not in STEPS=$STEPS)"
        return 0
    fi
    start=$(date +%s)
    log "START $name: $*"
    set +e
    "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    log "END   $name: exit $rc after $(($(date +%s) - start)) s"
    if [[ $rc -ne 0 ]]; then
        FAILED+=("$name(exit $rc)")
    fi
    return 0
}

# Python: a carried .venv first, then whatever python on PATH has torch + diffusers + transformers.
pick_python() {
    local py
    for py in "$ROOT/.venv/bin/python" python3 python; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import torch, diffusers, transformers" >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

if ! PY=$(pick_python); then
    log "no python with torch, diffusers and transformers found; nothing can run offline"
    exit 1
fi
if ! "$PY" -c "import fastgen" >/dev/null 2>&1; then
    # Offline editable install (no dependencies, no build isolation); if even that fails, the
    # repository root on PYTHONPATH is enough for the benchmark scripts.
    log "fastgen not importable by $PY: trying an offline editable install"
    timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 ||
        log "editable install failed; using PYTHONPATH=$ROOT"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
log "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# ----------------------------------------------------------------------------- environment
if command -v nvidia-smi >/dev/null 2>&1; then
    run_step nvidia_smi bash -c 'nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1; cat "$OUT/nvidia_smi.txt"'
else
    echo "nvidia-smi not found" >"$OUT/nvidia_smi.txt"
    log "nvidia-smi not found"
fi
run_step versions "$PY" -c '
import torch, diffusers, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("diffusers", diffusers.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
'

# ----------------------------------------------------------------------------- steps
# SD1.5-architecture sampling speed: teacher 50 DDIM steps + CFG vs LCM student 1/2/4 steps,
# eager and torch.compile. Extra flags via SD15_SPEED_ARGS (word-split on purpose).
# shellcheck disable=SC2086
run_step sd15_speed timeout --kill-after=20 180 "$PY" benchmarks/gpu/sd15_speed.py --out "$OUT" --budget-s 150 ${SD15_SPEED_ARGS:-}
[[ -f "$OUT/sd15_speed.md" ]] && cat "$OUT/sd15_speed.md"

# CLEAR local attention: full SDPA vs flex (raster and 2D tiles) vs the fused triton kernel at 4K/16K/64K
# image tokens + 512 text tokens, r = 8/16/32, bf16 (24 heads x 128, FLUX's shape).
run_step clear_attention timeout --kill-after=20 120 "$PY" benchmarks/clear_attention.py --device cuda --dtype bfloat16 \
    --out "$OUT" --budget-s 100
[[ -f "$OUT/clear_attention.md" ]] && cat "$OUT/clear_attention.md"

# Whole FLUX.1-dev architecture (random weights, bf16, ~24 GB): one transformer step at 1024/2048/4096 px
# (4K/16K/64K image tokens + 512 text), full attention vs CLEAR r=16 (triton kernel, tiled flex).
run_step flux_clear_speed timeout --kill-after=20 240 "$PY" benchmarks/gpu/flux_clear_speed.py --device cuda \
    --dtype bfloat16 --out "$OUT" --budget-s 200 ${FLUX_SPEED_ARGS:-}
[[ -f "$OUT/flux_clear_speed.md" ]] && cat "$OUT/flux_clear_speed.md"

# ============================================================================= MORE GPU STEPS HERE
# Append further steps below, each as one `run_step NAME CMD...` line with its own `timeout`, e.g.
#   run_step attention_kernels timeout 180 "$PY" benchmarks/gpu/attention_kernels.py --out "$OUT"
# ============================================================================= END OF STEPS

if [[ ${#FAILED[@]} -gt 0 ]]; then
    log "failed steps: ${FAILED[*]}"
    exit 1
fi
log "all steps finished"
