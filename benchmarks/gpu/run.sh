#!/usr/bin/env bash
# GPU benchmarks, all in one device call, from any working directory.
#
# The lent machine (kind nvidia-h200: Python 3.12, torch 2.11, triton 3.6, transformers 5.17, no
# diffusers, no package index) gets one call; README "GPU figures" has the exact command:
#
#     run(command="PACK_DIR=$OUT bash benchmarks/gpu/run.sh", carry=["benchmarks/gpu/bundle"], timeout_s=600)
#
# after `make gpu-bundle` here. The script
#   1. picks a Python with torch and transformers (a carried .venv, else python3, else python);
#   2. when that Python lacks diffusers (or DRY_RUN=1, or FORCE_BUNDLE=1), installs the wheels of
#      $BUNDLE (default benchmarks/gpu/bundle) with `pip install --no-index --no-deps --target $SITE`
#      into an empty $SITE, and puts the repository and $SITE on PYTHONPATH;
#   3. runs its steps, each under `timeout`, inside one time budget BUDGET_S (default 510 s: the whole
#      call stays under 9 minutes): `versions` (python, packages and where they come from, the GPU;
#      imports every fastgen module the steps import), `sd15_speed`, `clear_attention`,
#      `flux_clear_speed`, `train_lcd`. A step's timeout is its share (below) clipped to what is left
#      of the budget; its own --budget-s is that minus a margin, so it stops starting new cases in
#      time and writes what it measured; a step with under MIN_STEP_S (20 s) left is skipped
#      (`versions` always runs).
#
# Results: every step writes into $RESULTS (default benchmarks/results/gpu); each step's output is
# $RESULTS/<name>.log, the schedule $RESULTS/run_log.txt. The device tool brings back at most 8 files
# from its $OUT, so after every step the script also writes into $PACK_DIR (default: the tool's $OUT
# when it is set) gpu_results.tar.gz (all of $RESULTS), run_log.txt and summary.md (the steps'
# markdown tables): a call cut short still returns what was measured. Unpack here with
#     tar xzf <files_at>/gpu_results.tar.gz -C benchmarks/results/gpu
#
# Knobs: STEPS="sd15_speed train_lcd" (only these; versions always runs), BUDGET_S, RESULTS, PACK_DIR,
# BUNDLE, SITE, FORCE_BUNDLE=1, SD15_SPEED_ARGS / CLEAR_ATTENTION_ARGS / FLUX_SPEED_ARGS /
# TRAIN_LCD_ARGS (appended to a step's command; word-split on purpose), PLAN=1 (print the schedule,
# run nothing).
#
# DRY_RUN=1: the same script on a CPU: installs the bundle into an empty $SITE exactly as on the
# device, imports diffusers from it (versions fails otherwise) and runs every step's `--tiny --device
# cpu` path (sd15_speed --quick --tiny, clear_attention --quick, flux_clear_speed --tiny, train_lcd
# --tiny with aot_eager compilation) with a budget of 1500 s, results in /tmp/fastgen-gpu-dry. When
# `make gpu-bundle TWIN=1` has installed the image's torch 2.11 / triton 3.6 / torchvision 0.26 /
# transformers 5.17 / huggingface_hub 1.33 in benchmarks/gpu/image-twin/site (TWIN_SITE), the dry run
# puts them after the bundle on PYTHONPATH, so it runs on the device's versions of those (TWIN=0:
# not). The bundle's wheels are pure Python (py3-none-any; tests/test_gpu_bundle.py checks it), so the
# wheels built for the device's 3.12 are the very ones this 3.11 dry run installs.
#
# Exit code: 1 when the bundle could not be installed, `versions` failed, or any step failed (a step
# skipped for lack of budget is not a failure; the log says so).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$(pwd)
START=$(date +%s)

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

DRY_RUN=${DRY_RUN:-0}
PLAN=${PLAN:-0}
if [[ $PLAN == 1 ]]; then
    RESULTS=${RESULTS:-${TMPDIR:-/tmp}/fastgen-gpu-plan}
fi
if [[ $DRY_RUN == 1 ]]; then
    DRY_DIR=${DRY_DIR:-${TMPDIR:-/tmp}/fastgen-gpu-dry}
    RESULTS=${RESULTS:-$DRY_DIR/results}
    SITE=${SITE:-$DRY_DIR/site}
    BUDGET_S=${BUDGET_S:-1500}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    RESULTS=${RESULTS:-benchmarks/results/gpu}
    SITE=${SITE:-/tmp/fastgen-gpu-site}
    BUDGET_S=${BUDGET_S:-510}
fi
PACK_DIR=${PACK_DIR-${OUT:-}}
BUNDLE=${BUNDLE:-benchmarks/gpu/bundle}
TWIN_SITE=${TWIN_SITE:-benchmarks/gpu/image-twin/site}
MIN_STEP_S=${MIN_STEP_S:-20}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
if [[ -n $PACK_DIR ]]; then
    mkdir -p "$PACK_DIR"
    PACK_DIR=$(cd "$PACK_DIR" && pwd)
    [[ $PACK_DIR == "$RESULTS" ]] && PACK_DIR=""
fi
LOG="$RESULTS/run_log.txt"
FAILED=()
SKIPPED=()
PLANNED_S=0

log() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }

# pack: what the device tool brings back (<= 8 files): the whole results folder as one archive, the
# schedule, and the markdown tables. Rewritten after every step.
pack() {
    [[ -n $PACK_DIR ]] || return 0
    tar czf "$PACK_DIR/.gpu_results.tar.gz.tmp" -C "$RESULTS" . 2>/dev/null &&
        mv -f "$PACK_DIR/.gpu_results.tar.gz.tmp" "$PACK_DIR/gpu_results.tar.gz"
    cp -f "$LOG" "$PACK_DIR/run_log.txt" 2>/dev/null
    local md
    {
        for md in "$RESULTS"/*.md; do
            [[ -f $md ]] || continue
            printf '\n<!-- %s -->\n' "$(basename "$md")"
            cat "$md"
        done
    } >"$PACK_DIR/summary.md"
}

# run_step NAME SECONDS MARGIN CMD...: run CMD under `timeout` for SECONDS clipped to the budget left;
# an argument @BUDGET@ in CMD becomes that timeout minus MARGIN (the step's own --budget-s). Output to
# $RESULTS/NAME.log; start, end, duration and exit code to the log; never aborts the script.
run_step() {
    local name=$1 want=$2 margin=$3
    shift 3
    if [[ -n ${STEPS:-} && $name != versions && " $STEPS " != *" $name "* ]]; then
        log "SKIP  $name (not in STEPS=$STEPS)"
        return 0
    fi
    local left=$((BUDGET_S - $(elapsed)))
    local t=$want
    ((t > left - 5)) && t=$((left - 5))
    if [[ $name == versions ]]; then
        ((t < 10)) && t=10 # the import check always runs: without it no step would be trusted
    elif ((t < MIN_STEP_S)); then
        log "SKIP  $name (budget: ${left} s of BUDGET_S=$BUDGET_S left, a step needs $MIN_STEP_S)"
        SKIPPED+=("$name")
        pack
        return 0
    fi
    local inner=$((t - margin))
    ((inner < 5)) && inner=5
    local cmd=() arg
    for arg in "$@"; do
        [[ $arg == "@BUDGET@" ]] && arg=$inner
        cmd+=("$arg")
    done
    if [[ $PLAN == 1 ]]; then
        log "PLAN  $name: timeout ${t} s (share ${want} s): ${cmd[*]}"
        PLANNED_S=$((PLANNED_S + want))
        return 0
    fi
    local start rc
    start=$(date +%s)
    log "START $name (timeout ${t} s, ${left} s of the budget left): ${cmd[*]}"
    timeout --kill-after=10 "$t" "${cmd[@]}" 2>&1 | tee "$RESULTS/$name.log"
    rc=${PIPESTATUS[0]}
    log "END   $name: exit $rc after $(($(date +%s) - start)) s$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
    [[ $rc -ne 0 ]] && FAILED+=("$name(exit $rc)")
    pack
    return 0
}

show() { # show FILE...: print the first of these that exists (a step's markdown table)
    local f
    for f in "$@"; do
        if [[ -f $f ]]; then
            cat "$f"
            return 0
        fi
    done
}

# ----------------------------------------------------------------------------- python and the bundle
log "fastgen GPU run: DRY_RUN=$DRY_RUN BUDGET_S=$BUDGET_S RESULTS=$RESULTS PACK_DIR=${PACK_DIR:-none} STEPS=${STEPS:-all}"
# has_modules PY NAME...: PY finds these modules (find_spec: nothing is imported, so it costs no time)
has_modules() {
    local py=$1
    shift
    "$py" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(n) for n in sys.argv[1:]))' "$@" >/dev/null 2>&1
}
pick_python() {
    local py
    for py in ${PYTHON:-} "$ROOT/.venv/bin/python" python3 python; do
        if command -v "$py" >/dev/null 2>&1 && has_modules "$py" torch transformers; then
            echo "$py"
            return 0
        fi
    done
    return 1
}
if [[ $PLAN == 1 ]]; then
    PY=${PYTHON:-python3}
elif ! PY=$(pick_python); then
    log "no python with torch and transformers found; nothing can run offline"
    pack
    exit 1
fi

PYPATH="$ROOT"
if [[ $PLAN != 1 ]] && { [[ $DRY_RUN == 1 || ${FORCE_BUNDLE:-0} == 1 ]] || ! has_modules "$PY" diffusers; }; then
    shopt -s nullglob
    wheels=("$BUNDLE"/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -eq 0 ]]; then
        log "$PY has no diffusers and $BUNDLE holds no wheels: run 'make gpu-bundle' and carry $BUNDLE"
        pack
        exit 1
    fi
    rm -rf "$SITE"
    mkdir -p "$SITE"
    t0=$(date +%s)
    if ! timeout 180 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --no-cache-dir --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1; then
        log "installing the bundle into $SITE failed (pip's output above in $LOG)"
        pack
        exit 1
    fi
    log "installed ${#wheels[@]} wheels of $BUNDLE into $SITE in $(($(date +%s) - t0)) s: $(cd "$BUNDLE" && ls *.whl | tr '\n' ' ')"
    PYPATH="$PYPATH:$SITE"
    EXPECT_SITE=(--expect-site "$SITE")
else
    EXPECT_SITE=()
fi
if [[ $DRY_RUN == 1 && ${TWIN:-1} != 0 && -d $TWIN_SITE ]]; then
    PYPATH="$PYPATH:$(cd "$TWIN_SITE" && pwd)"
    log "dry run on the image twin $TWIN_SITE (the image's torch / triton / torchvision / transformers / huggingface_hub)"
    # The twin's torch 2.11 compiling FlexAttention for this CPU (inductor C++) aborted with heap corruption
    # ("malloc(): unaligned tcache chunk detected") in one of two dry runs; the device runs flex on CUDA, never
    # this path. On the twin the CLEAR step times the reference backend; TWIN=0 dry-runs flex_tiled on the venv.
    FLUX_SPEED_ARGS=${FLUX_SPEED_ARGS:---backends full,reference}
    log "twin: flux_clear_speed runs ${FLUX_SPEED_ARGS} (CPU-compiled flex is not run on the twin)"
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
log "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)); PYTHONPATH=$PYTHONPATH"

# ----------------------------------------------------------------------------- environment
if [[ $PLAN != 1 ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi >"$RESULTS/nvidia_smi.txt" 2>&1
        cat "$RESULTS/nvidia_smi.txt"
    else
        echo "nvidia-smi not found" >"$RESULTS/nvidia_smi.txt"
        log "nvidia-smi not found"
    fi
fi
run_step versions 40 5 "$PY" benchmarks/gpu/versions.py --out "$RESULTS" "${EXPECT_SITE[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    log "versions failed: the steps would not run here; stopping (see $RESULTS/versions.log)"
    pack
    exit 1
fi

# ----------------------------------------------------------------------------- steps
# Shares of the 510 s budget: versions 40 + sd15_speed 90 + clear_attention 60 + flux_clear_speed 120
# + train_lcd 200 = 510 (the bundle install before them takes a few seconds; the last step's
# timeout is clipped by what is left).
if [[ $DRY_RUN == 1 ]]; then
    SD15=(--quick --tiny --device cpu --threads 1)
    CLEAR=(--quick --device cpu --threads 1)
    FLUX=(--tiny --device cpu)
    TRAIN=(--tiny --device cpu --threads 1 --sd15-latent 8 --sd15-batch 2 --sd15-warmup 0 --sd15-repeats 1
        --compile-backend aot_eager)
    SHARE_SD15=240 SHARE_CLEAR=400 SHARE_FLUX=240 SHARE_TRAIN=480
else
    SD15=(--device cuda --repeats 5 --warmup 2)
    CLEAR=(--device cuda --dtype bfloat16)
    FLUX=(--device cuda --dtype bfloat16)
    TRAIN=(--device cuda --sd15-latent 64 --sd15-batch 8 --sd15-warmup 1 --sd15-repeats 3)
    SHARE_SD15=90 SHARE_CLEAR=60 SHARE_FLUX=120 SHARE_TRAIN=200
fi

# SD1.5-architecture sampling speed: teacher 50 DDIM steps + CFG vs LCM student 1/2/4 steps, 512 px fp16,
# eager and torch.compile.
# shellcheck disable=SC2086
run_step sd15_speed "$SHARE_SD15" 25 "$PY" benchmarks/gpu/sd15_speed.py --out "$RESULTS" --budget-s @BUDGET@ \
    "${SD15[@]}" ${SD15_SPEED_ARGS:-}
[[ $PLAN == 1 ]] || show "$RESULTS/sd15_speed.md"

# CLEAR local attention: full SDPA vs flex (raster and 2D tiles) vs the fused triton kernel at 4K/16K/64K
# image tokens + 512 text tokens, r = 8/16/32, bf16 (24 heads x 128, FLUX's shape).
# shellcheck disable=SC2086
run_step clear_attention "$SHARE_CLEAR" 15 "$PY" benchmarks/clear_attention.py --out "$RESULTS" --budget-s @BUDGET@ \
    "${CLEAR[@]}" ${CLEAR_ATTENTION_ARGS:-}
[[ $PLAN == 1 ]] || show "$RESULTS/clear_attention.md" "$RESULTS/clear_attention_quick.md"

# Whole FLUX.1-dev architecture (random weights, bf16, ~24 GB): one transformer step at 1024/2048/4096 px
# (4K/16K/64K image tokens + 512 text), full attention vs CLEAR r=16 (triton kernel, tiled flex).
# shellcheck disable=SC2086
run_step flux_clear_speed "$SHARE_FLUX" 25 "$PY" benchmarks/gpu/flux_clear_speed.py --out "$RESULTS" --budget-s @BUDGET@ \
    "${FLUX[@]}" ${FLUX_SPEED_ARGS:-}
[[ $PLAN == 1 ]] || show "$RESULTS/flux_clear_speed.md"

# The LCD training step on the SD1.5 architecture (random weights, full mode), 512 px, batch 8: the reference
# step of diffusers' example script (uncached VAE + text encoding, two teacher forwards, every network in
# float32, default AdamW), then one optimisation at a time on the best configuration so far (cache, batched
# CFG, fused AdamW, bf16 teacher, channels-last, torch.compile, bf16 autocast), each kept where it holds;
# samples/s and peak memory side by side in one process (benchmarks/train_throughput.py --study ladder).
# shellcheck disable=SC2086
run_step train_lcd "$SHARE_TRAIN" 25 "$PY" benchmarks/train_throughput.py --out "$RESULTS" --budget-s @BUDGET@ \
    --study ladder --teachers sd15-arch --modes full \
    --rungs reference,cache,batched_cfg,fused_adamw,bf16_teacher,channels_last,compile,bf16_autocast \
    "${TRAIN[@]}" ${TRAIN_LCD_ARGS:-}
[[ $PLAN == 1 ]] || show "$RESULTS/train_throughput.md"

# ============================================================================= MORE GPU STEPS HERE
# Append further steps below, each as one `run_step NAME SHARE_S MARGIN_S CMD...` line (@BUDGET@ in CMD
# becomes the step's own time budget), and take its share from the ones above: the shares add up to
# BUDGET_S.
# ============================================================================= END OF STEPS

if [[ $PLAN == 1 ]]; then
    log "PLAN  shares add up to ${PLANNED_S} s of BUDGET_S=$BUDGET_S"
    exit 0
fi
[[ ${#SKIPPED[@]} -gt 0 ]] && log "skipped for lack of budget: ${SKIPPED[*]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    log "failed steps: ${FAILED[*]} ($(elapsed) s in all)"
    pack
    exit 1
fi
log "all steps finished in $(elapsed) s"
pack
