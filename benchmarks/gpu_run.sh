#!/usr/bin/env bash
# The one script a session with a GPU runs, first, before anything else: correctness on the GPU,
# adder kernels vs cuDNN, tuning, the model report, and the SASS of the GPU machine's own Triton,
# each step under its own `timeout` so one hang cannot eat the lease, everything written to $OUT.
#
# Through the device tool (one call; nothing to carry). The machine's python3 (the image 'cuda', as
# the device tool's KINDS.md lists it: torch 2.11, Triton 3.6) has, of what this script and the
# package use, only these distributions and what they require; tests/gpu_image.py builds a venv of
# exactly this list for CI, so a module that needs anything else fails there first:
# IMAGE_PACKAGES: torch triton pytest pytest-xdist pytest-timeout pandas matplotlib tqdm filelock setuptools
# Nothing can be installed there, so the package runs from the checkout through PYTHONPATH.
#
#     run(command="bash benchmarks/gpu_run.sh", timeout_s=560)
#
# The plan for a 15-minute lease: a machine start of up to 4 minutes, then this one call of at most
# 9; the steps share a deadline of TOTAL_S seconds (default 520), each gets at most its own cap and
# what is left of the deadline, and is skipped when under 15 s remain. Then give the machine back,
# or rerun only some steps at once while it is warm (30 s), e.g.
# `run(command="TOTAL_S=200 bash benchmarks/gpu_run.sh report", timeout_s=240)` (each call starts with
# an empty tuning cache: a report rerun alone times the default and shipped configs).
# Steps (default: all, in this order; cap in seconds) and the question each answers:
#
#     info             40  does the package import on the image? nvidia-smi, torch/Triton/cuDNN/CUDA
#                          versions, device properties; imports every module the later steps use
#                          and fails the run (exit 1) when one does not import
#     tests           110  are the kernels right on a GPU? pytest, compiled for the GPU (xdist,
#                          per-test timeout): $GPU_TESTS -- forward/backward kernels,
#                          channels_last and strided inputs, float16/bfloat16, autocast, float64
#                          on CUDA (the torch backend), the convolution identity, the int8
#                          forward kernel in both forms (unpacked and inline-PTX vabsdiff4)
#     kernel_vs_cudnn 150  how fast against cuDNN? benchmarks/kernel_vs_cudnn.py $KVC_ARGS: float64
#                          slice checks, then adder vs cuDNN (float32 TF32 off, TF32, float16,
#                          bfloat16; both gradients) on ResNet-50's 3x3 layers at batch 64, with the
#                          issue 3/4 goals; saved after every layer
#     sass             30  does the GPU's Triton (3.6) emit the loop that the committed SASS matrix
#                          shows? benchmarks/sass_screen.py, the three kernels on ResNet-50's first
#                          3x3 layer (compile-only)
#     tune            100  tuned vs default: python -m triton_adder.tune --model $MODEL --ops
#                          $TUNE_OPS --budget-s $TUNE_BUDGET_S --no-report; problems in order of
#                          their share of the model's work, the cache saved after every winner, so
#                          a timeout keeps what was tuned (the largest problems; 22 forward problems
#                          at 10 s do not fit in 100 s, so expect "partial"); a "stored" line per
#                          winner gives its time, the default's and the speedup as it happens
#     report           90  the whole model: python -m triton_adder.bench (report.html +
#                          results.csv/json, batch $TUNE_BATCH, quick unless REPORT_QUICK=0), with
#                          the configs the tune step stored where it stored one (the same command the
#                          rehearsal runs)
#
# What comes back in $OUT (flat): gpu_run.log (everything printed; its summary last),
# kernel_vs_cudnn_<device>.csv/.json, the tuning cache <GPU>__sm90__triton-<v>.json and
# report.tar.gz (<model>-<device>/report.html, results.csv/json). Commit it all under
# results/gpu_run/<device>/ (unpack the tarball there), and copy the cache file to tuning/configs/
# (tuning/configs/README.md: only "functional": false entries belong there), naming the device and
# versions that gpu_run.log and the JSON metadata give.
#
# REHEARSAL=1 (on a machine without a GPU; CI runs it, tests/test_gpu_image.py, in a venv of the
# image's packages): every step runs, the Triton kernels through the interpreter at tiny shapes
# (LeNet-5's first 5x5 layer at batch 1 for kernel_vs_cudnn; the tuner's shrunk problems) and the
# report's baselines on the CPU, so each line the GPU run takes executes before a lease; times are
# interpreter and CPU wall clock, never GPU figures. Its outputs are committed in
# results/gpu_run/cpu-rehearsal/.
#
# Environment: OUT (default /tmp/gpu_run_out), TOTAL_S (520; 1500 in a rehearsal), MODEL
# (resnet50; lenet5bn in a rehearsal), TUNE_BUDGET_S (10), TUNE_OPS (fwd), TUNE_BATCH (64; 2),
# REPORT_QUICK (1), PYTHON (python3), PYTEST_WORKERS (8), KVC_ARGS, TUNE_CAP_S (100; a tune-only lease:
# `TOTAL_S=540 TUNE_CAP_S=520 bash benchmarks/gpu_run.sh tune`).
# Exit status: 0 when every step that ran succeeded and produced its files, else 1 (the summary
# names the failing steps). Without a GPU and without REHEARSAL (a dry run) info still imports
# everything, kernel_vs_cudnn exits cleanly, and the GPU steps are skipped.

set -u
set -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REHEARSAL=${REHEARSAL:-0}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_run_out}
PYTHON=${PYTHON:-python3}
# The budget per problem covers the compile-time screen too (tuning/search.py), and a batch screens for at
# most a quarter of it in the coarse pass: at 3 s nothing but the default and the shipped verdicts'
# configs (tuning/screens/) would be timed. 10 s screens a few configs per problem and, in the step's
# 100 s, tunes the largest problems first (by their share of the model's work).
TUNE_BUDGET_S=${TUNE_BUDGET_S:-10}
TUNE_OPS=${TUNE_OPS:-fwd}
REPORT_QUICK=${REPORT_QUICK:-1}
TUNE_CAP_S=${TUNE_CAP_S:-100}  # the tune step's cap (x5 in a rehearsal, as every cap)
PYTEST_WORKERS=${PYTEST_WORKERS:-8}
GPU_TESTS="tests/test_kernel_forward.py tests/test_kernel_backward.py tests/test_functional.py
    tests/test_backends.py tests/test_amp.py tests/test_conv_identity.py tests/test_kernel_int8.py"
if [[ $REHEARSAL == 1 ]]; then
    TOTAL_S=${TOTAL_S:-1500}
    MODEL=${MODEL:-lenet5bn}
    TUNE_BATCH=${TUNE_BATCH:-2}
    KVC_ARGS=${KVC_ARGS:---cpu-rehearsal --model lenet5bn --kernel-size 5 --batch 1 --max-layers 1 --quick --check-images 1}
else
    TOTAL_S=${TOTAL_S:-520}
    MODEL=${MODEL:-resnet50}
    TUNE_BATCH=${TUNE_BATCH:-64}
    KVC_ARGS=${KVC_ARGS:---model resnet50 --batch 64}
fi
ALL_STEPS="info tests kernel_vs_cudnn sass tune report"
LAST_STATUS=
STEPS=${*:-$ALL_STEPS}

mkdir -p "$OUT"
LOG=$OUT/gpu_run.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
STARTED=$(date +%s)
DEADLINE=$((STARTED + TOTAL_S))
SUMMARY=()
FAILED=0

cd "$REPO" || exit 1
# The interpreter runs the kernels on the CPU: only the rehearsal's kernel steps ask for it (`interpret`).
unset TRITON_INTERPRET
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_ADDER_CACHE_DIR=$WORK/tuning-cache   # fresh: kernel_vs_cudnn sees defaults (+ shipped configs)
export TRITON_DEFAULT_FP_FUSION=1           # Triton >= 3.9 warns when unset; the kernels rely on FMA fusion
mkdir -p "$TRITON_ADDER_CACHE_DIR"

say() { echo "$*" | tee -a "$LOG"; }

has_gpu() { "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

# interpret COMMAND...: in a rehearsal, run COMMAND with the Triton interpreter on; else as it is.
interpret() {
    if [[ $REHEARSAL == 1 ]]; then TRITON_INTERPRET=1 "$@"; else "$@"; fi
}

# run_step NAME CAP_SECONDS COMMAND...: run under `timeout` (cap, or what is left of the deadline);
# COMMAND may be one of the step_* functions below. Output goes to the terminal, the log and, when
# STEP_CAPTURE names a file, that file too.
run_step() {
    local name=$1 cap=$2
    shift 2
    local now left limit begin rc status files=("$LOG")
    ((REHEARSAL == 1)) && cap=$((cap * 5))  # the interpreter on 2 CPU cores is far slower than the GPU
    now=$(date +%s)
    left=$((DEADLINE - now))
    limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        SUMMARY+=("$(printf '%-16s %-9s %5s s  (%s s left of TOTAL_S=%s)' "$name" skipped - "$left" "$TOTAL_S")")
        say "=== $name: skipped, only $left s left of the deadline"
        LAST_STATUS=skipped
        return 0
    fi
    say ""
    say "=== $name (limit $limit s) $(date -u +%H:%M:%S) UTC: $*"
    begin=$(date +%s)
    if [[ -n ${STEP_CAPTURE:-} ]]; then
        : >"$STEP_CAPTURE"
        files+=("$STEP_CAPTURE")
    fi
    # bash -c: `timeout` runs programs, not shell functions (the step_* functions are exported).
    timeout -k 10 "$limit" bash -c '"$@"' run_step "$@" 2>&1 | tee -a "${files[@]}"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED($rc)" ;;
    esac
    # PARTIAL_OK=1: a step that saves as it goes (tune, kernel_vs_cudnn) may run out of time; what it saved is
    # checked after (collect_*), and its log lines say what it measured.
    [[ $status == ok ]] || { [[ $status == TIMEOUT && ${PARTIAL_OK:-0} == 1 ]] && status=partial; } || FAILED=1
    LAST_STATUS=$status
    SUMMARY+=("$(printf '%-16s %-9s %5s s' "$name" "$status" $(($(date +%s) - begin)))")
    say "=== $name: $status after $(($(date +%s) - begin)) s"
}

# fail_after NAME WHY: a step that exited 0 without producing what it must counts as failed.
fail_after() {
    FAILED=1
    SUMMARY+=("$(printf '%-16s %-9s %5s s  (%s)' "$1" FAILED - "$2")")
    say "=== $1: FAILED: $2"
}

step_info() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --format=csv \
            --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.total,temperature.gpu,power.draw
    else
        echo "nvidia-smi: not available"
    fi
    echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'no .git in this copy')"
    "$PYTHON" - <<'EOF'
import importlib, os, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton: not importable:", error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
elif os.environ.get("REHEARSAL") == "1":
    print("NO CUDA DEVICE: CPU REHEARSAL (kernels through the Triton interpreter; no GPU figures)")
else:
    print("NO CUDA DEVICE: the GPU steps will be skipped (dry run)")
for name in ("xdist", "pytest_timeout", "pandas", "matplotlib"):
    try:
        __import__(name)
        print(name, "ok")
    except ImportError:
        print(name, "MISSING")
# Every module the later steps use, from the checkout (PYTHONPATH): an import error fails the run here.
failed = []
for module in ("triton_adder", "triton_adder.backends.triton", "triton_adder.autotune.tuner",
               "triton_adder.autotune.lookup", "triton_adder.tune", "triton_adder.bench", "triton_adder.report",
               "triton_adder.measure.sass", "tuning", "reports"):
    try:
        module = importlib.import_module(module)
        print("import", module.__name__, "from", os.path.dirname(module.__file__))
    except Exception as error:
        failed.append(f"{module}: {type(error).__name__}: {error}")
for line in failed:
    print("IMPORT FAILED:", line)
sys.exit(1 if failed else 0)
EOF
}

step_tests() {
    local extra=()
    "$PYTHON" -c 'import xdist' 2>/dev/null && extra+=(-n "$PYTEST_WORKERS")
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 120)
    # shellcheck disable=SC2086
    # -v: each test's name and outcome as it ends, so a step cut short by its cap still says which failed.
    "$PYTHON" -m pytest -v -p no:cacheprovider -ra "${extra[@]}" $GPU_TESTS
}

step_kernel_vs_cudnn() {
    # shellcheck disable=SC2086
    interpret "$PYTHON" benchmarks/kernel_vs_cudnn.py $KVC_ARGS --out "$OUT"
}

step_sass() {
    # ResNet-50's 64-channel 3x3 layer at batch 64, each kernel's heuristic default config.
    local kernel rc=0
    for kernel in forward grad_input grad_weight; do
        "$PYTHON" benchmarks/sass_screen.py --kernel "$kernel" --shape 64 64 56 56 --cout 64 || rc=1
    done
    return $rc
}

tune_arguments() {
    echo --model "$MODEL" --batch-size "$TUNE_BATCH" --ops "$TUNE_OPS" --cache-dir "$TRITON_ADDER_CACHE_DIR"
}

step_tune() {
    # shellcheck disable=SC2046
    interpret "$PYTHON" -m triton_adder.tune $(tune_arguments) --budget-s "$TUNE_BUDGET_S" --no-report
}

step_report() {
    # bench writes runs/<model>-<device>/ under the working directory: run in $WORK/report.
    local quick=()
    [[ $REPORT_QUICK == 1 ]] && quick=(--quick)
    mkdir -p "$WORK/report"
    cd "$WORK/report" || return 1
    "$PYTHON" -m triton_adder.bench --model "$MODEL" --batch-size "$TUNE_BATCH" "${quick[@]}"
}

collect_tuning_cache() {
    local f found=0
    for f in "$TRITON_ADDER_CACHE_DIR"/*.json; do
        [[ -f $f ]] || continue
        cp "$f" "$OUT/" && found=1 && say "tuning cache: $OUT/$(basename "$f")"
    done
    ((found)) || say "tuning cache: nothing tuned"
    [[ $LAST_STATUS != ok && $LAST_STATUS != partial ]] || ((found)) || fail_after tune "it stored no winner"
}

collect_report() {
    if compgen -G "$WORK/report/runs/*/report.html" >/dev/null; then
        tar -C "$WORK/report/runs" -czf "$OUT/report.tar.gz" . && say "report: $OUT/report.tar.gz ($(
            tar -tzf "$OUT/report.tar.gz" | tr '\n' ' '))"
    else
        say "report: none written"
        [[ $LAST_STATUS != ok ]] || fail_after report "it finished but wrote no report.html"
    fi
}

export -f step_info step_tests step_kernel_vs_cudnn step_sass step_tune step_report tune_arguments interpret
export REPO OUT PYTHON MODEL TUNE_BUDGET_S TUNE_OPS TUNE_BATCH REPORT_QUICK PYTEST_WORKERS WORK REHEARSAL \
    KVC_ARGS GPU_TESTS

say "gpu_run.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) steps: $STEPS; TOTAL_S=$TOTAL_S; REHEARSAL=$REHEARSAL; OUT=$OUT; repo $REPO"
GPU=0
has_gpu && GPU=1
if ((GPU)) && [[ $REHEARSAL == 1 ]]; then
    say "REHEARSAL=1 is for a machine without a GPU (the interpreter would stand in for the GPU): unset it"
    exit 1
fi
if ((!GPU)) && [[ $REHEARSAL != 1 ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    # A GPU machine whose torch cannot use its GPU must not pass as a dry run that skipped the GPU steps.
    say "nvidia-smi lists a GPU but torch.cuda.is_available() is False: check the driver and torch's CUDA build"
    FAILED=1
fi
for step in $STEPS; do
    case $step in
        info) run_step info 40 step_info ;;
        kernel_vs_cudnn)
            # Without a GPU (and without REHEARSAL) it says it needs one and exits 0.
            # It saves its CSV/JSON after every layer: a cap reached keeps the layers done (PARTIAL_OK).
            PARTIAL_OK=1 STEP_CAPTURE=$WORK/kernel_vs_cudnn.txt run_step kernel_vs_cudnn 150 step_kernel_vs_cudnn
            if [[ $LAST_STATUS == partial ]] && ! compgen -G "$OUT/kernel_vs_cudnn_*.csv" >/dev/null; then
                fail_after kernel_vs_cudnn "cut short before its first layer was saved"
            fi
            ;;
        sass) run_step sass 30 step_sass ;;  # compile-only: runs without a GPU too
        tests | tune | report)
            if ((!GPU)) && [[ $REHEARSAL != 1 ]]; then
                SUMMARY+=("$(printf '%-16s %-9s %5s s  (no CUDA device)' "$step" skipped -)")
                say "=== $step: skipped (no CUDA device)"
                continue
            fi
            case $step in
                tests) run_step tests 110 step_tests ;;
                tune)
                    PARTIAL_OK=1 run_step tune "$TUNE_CAP_S" step_tune
                    collect_tuning_cache
                    ;;
                report)
                    run_step report 90 step_report
                    collect_report
                    ;;
            esac
            ;;
        *)
            say "unknown step '$step'; known: $ALL_STEPS"
            FAILED=1
            ;;
    esac
done

# The reply shows the end of the output: repeat the comparison tables, then the step summary.
if [[ -s $WORK/kernel_vs_cudnn.txt ]] && grep -q '^Layers:' "$WORK/kernel_vs_cudnn.txt"; then
    say ""
    say "=== kernel_vs_cudnn tables (again)"
    sed -n '/^Layers:/,$p' "$WORK/kernel_vs_cudnn.txt" | tee -a "$LOG"
fi
say ""
say "=== summary ($(($(date +%s) - STARTED)) s of TOTAL_S=$TOTAL_S)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
say "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$WORK"
exit $FAILED
