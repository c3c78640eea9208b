#!/usr/bin/env bash
# The one script a session with a GPU runs: correctness on the GPU, adder kernels vs cuDNN, tuning,
# the model report, and the SASS mix under the GPU machine's Triton -- in about 8 minutes, each step
# under its own `timeout` so one hang cannot eat the lease, everything written to $OUT.
#
# Through the device tool (one call; nothing to carry). The machine's python3 (the image 'cuda', as
# the device tool's KINDS.md lists it: torch 2.11, Triton 3.6) has, of what this script and the
# package use, only these distributions and what they require; tests/gpu_image.py builds a venv of
# exactly this list for CI, so a module that needs anything else fails there first:
# IMAGE_PACKAGES: torch triton pytest pytest-xdist pytest-timeout pandas matplotlib tqdm filelock setuptools
# Nothing can be installed there, so the package runs from the checkout through PYTHONPATH.
#
#     run(command="bash benchmarks/gpu_run.sh", timeout_s=570)
#
# The steps share a deadline of TOTAL_S seconds (default 500); each step gets at most its own cap and
# what is left of the deadline, and is skipped when under 15 s remain. With a machine start of 1-2
# minutes that leaves about 3 minutes of a 15-minute lease: rerun only some steps at once, while the
# machine is still warm (30 s), e.g. `run(command="TOTAL_S=200 bash benchmarks/gpu_run.sh report",
# timeout_s=260)`, or give it back. Steps (default: all, in this order; cap in seconds):
#
#     info             30  nvidia-smi, torch/Triton/cuDNN/CUDA versions, device properties
#     kernel_vs_cudnn 170  benchmarks/kernel_vs_cudnn.py: float64 slice checks, then adder vs cuDNN
#                          on ResNet-50's 3x3 layers at batch 64 (issue 3 and 4 goals); saved per layer
#     tests           120  pytest tests/test_kernel_forward.py tests/test_kernel_backward.py
#                          tests/test_functional.py, compiled for the GPU (xdist, per-test timeout)
#     sass             45  benchmarks/sass_screen.py, the three kernels on ResNet-50's first
#                          3x3 layer (compile-only: does Triton 3.6 emit the loop Triton 3.9 does?)
#     tune            110  python -m triton_adder.tune --model resnet50 --ops $TUNE_OPS --budget-s
#                          $TUNE_BUDGET_S --no-report: a token search (default config and about one
#                          other per problem) whose cache is saved after every winner, so a timeout
#                          keeps what was tuned. A real search needs its own lease, e.g.
#                          `TOTAL_S=540 TUNE_OPS=fwd,bwd TUNE_BUDGET_S=10 bash benchmarks/gpu_run.sh tune`
#     report          170  the model report (report.html + results.csv/json, batch 64, quick unless
#                          REPORT_QUICK=0) with the tuned configs: through `triton_adder.tune --report`
#                          (tuning table included, every problem cached) when the tune step finished,
#                          else `triton_adder.bench` (tuned rows where cached)
#
# What comes back in $OUT (at most 8 files, flat) and where to commit it:
#     gpu_run.log                       everything printed, every step; its summary is printed last
#     kernel_vs_cudnn_<device>.csv/.json  -> results/benchmarks/
#     <GPU>__sm90__triton-<v>.json      the tuning cache -> tuning/configs/ (tuning/configs/README.md:
#                                         same file name; only "functional": false entries belong there)
#     report.tar.gz                     `tar -xzf report.tar.gz` at the repository root unpacks
#                                         runs/resnet50-<device>/ (report.html, results.csv/json);
#                                         move it to results/reports/ to commit it
# Commit them with the device and versions that gpu_run.log and the JSON metadata name.
#
# Environment: OUT (default /tmp/gpu_run_out), TOTAL_S (500), TUNE_BUDGET_S (3), TUNE_OPS (fwd),
# TUNE_BATCH (64), REPORT_QUICK (1), PYTHON (python3), PYTEST_WORKERS (8).
# Exit status: 0 when every step that ran succeeded, else 1 (the summary names the failing steps).
# Without a GPU (a dry run) the info step says so, kernel_vs_cudnn exits cleanly, and the GPU steps
# are skipped.

set -u
set -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_run_out}
PYTHON=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-500}
TUNE_BUDGET_S=${TUNE_BUDGET_S:-3}
TUNE_OPS=${TUNE_OPS:-fwd}
TUNE_BATCH=${TUNE_BATCH:-64}
REPORT_QUICK=${REPORT_QUICK:-1}
PYTEST_WORKERS=${PYTEST_WORKERS:-8}
ALL_STEPS="info kernel_vs_cudnn tests sass tune report"
TUNE_COMPLETE=0  # 1 once the tune step finished: every problem of TUNE_OPS is then cached
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
unset TRITON_INTERPRET                      # the interpreter would run the kernels on the CPU
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_ADDER_CACHE_DIR=$WORK/tuning-cache   # fresh: kernel_vs_cudnn sees defaults (+ shipped configs)
export TRITON_DEFAULT_FP_FUSION=1           # Triton >= 3.9 warns when unset; the kernels rely on FMA fusion
mkdir -p "$TRITON_ADDER_CACHE_DIR"

say() { echo "$*" | tee -a "$LOG"; }

has_gpu() { "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

# run_step NAME CAP_SECONDS COMMAND...: run under `timeout` (cap, or what is left of the deadline);
# COMMAND may be one of the step_* functions below. Output goes to the terminal, the log and, when
# STEP_CAPTURE names a file, that file too.
run_step() {
    local name=$1 cap=$2
    shift 2
    local now left limit begin rc status files=("$LOG")
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
    [[ $status == ok ]] || FAILED=1
    LAST_STATUS=$status
    SUMMARY+=("$(printf '%-16s %-9s %5s s' "$name" "$status" $(($(date +%s) - begin)))")
    say "=== $name: $status after $(($(date +%s) - begin)) s"
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
import os, platform, sys
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
else:
    print("NO CUDA DEVICE: the GPU steps will be skipped (dry run)")
import triton_adder  # from the checkout (PYTHONPATH)
print("triton_adder from", os.path.dirname(triton_adder.__file__))
for name in ("xdist", "pytest_timeout", "pandas", "matplotlib"):
    try:
        __import__(name)
        print(name, "ok")
    except ImportError:
        print(name, "MISSING")
EOF
}

step_tests() {
    local extra=()
    "$PYTHON" -c 'import xdist' 2>/dev/null && extra+=(-n "$PYTEST_WORKERS")
    "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && extra+=(--timeout 120)
    "$PYTHON" -m pytest -q -p no:cacheprovider -ra "${extra[@]}" \
        tests/test_kernel_forward.py tests/test_kernel_backward.py tests/test_functional.py
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
    echo --model resnet50 --batch-size "$TUNE_BATCH" --ops "$TUNE_OPS" --cache-dir "$TRITON_ADDER_CACHE_DIR"
}

step_tune() {
    local no_report=()
    # Newer tune writes its report by default: here the report is its own step.
    "$PYTHON" -m triton_adder.tune --help 2>/dev/null | grep -q -- --no-report && no_report=(--no-report)
    # shellcheck disable=SC2046
    "$PYTHON" -m triton_adder.tune $(tune_arguments) --budget-s "$TUNE_BUDGET_S" "${no_report[@]}"
}

step_report() {
    # Both commands write runs/<model>-<device>/ under the working directory: run in
    # $WORK/report so that the tarball unpacks to the same path at the repository root.
    local quick=()
    [[ $REPORT_QUICK == 1 ]] && quick=(--quick)
    mkdir -p "$WORK/report"
    cd "$WORK/report" || return 1
    if [[ $TUNE_COMPLETE == 1 ]]; then
        # Every problem is cached: tune goes straight to the benchmark and adds its tuning table.
        # shellcheck disable=SC2046
        "$PYTHON" -m triton_adder.tune $(tune_arguments) --budget-s 1 --report "${quick[@]}"
    else
        "$PYTHON" -m triton_adder.bench --model resnet50 --batch-size "$TUNE_BATCH" "${quick[@]}"
    fi
}

collect_tuning_cache() {
    local f found=0
    for f in "$TRITON_ADDER_CACHE_DIR"/*.json; do
        [[ -f $f ]] || continue
        cp "$f" "$OUT/" && found=1 && say "tuning cache: $OUT/$(basename "$f")"
    done
    ((found)) || say "tuning cache: nothing tuned"
}

collect_report() {
    if [[ -d $WORK/report/runs ]]; then
        tar -C "$WORK/report" -czf "$OUT/report.tar.gz" runs && say "report: $OUT/report.tar.gz ($(
            tar -tzf "$OUT/report.tar.gz" | tr '\n' ' '))"
    else
        say "report: none written"
    fi
}

export -f step_info step_tests step_sass step_tune step_report tune_arguments
export REPO PYTHON TUNE_BUDGET_S TUNE_OPS TUNE_BATCH REPORT_QUICK PYTEST_WORKERS WORK TUNE_COMPLETE

say "gpu_run.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) steps: $STEPS; TOTAL_S=$TOTAL_S; OUT=$OUT; repo $REPO"
GPU=0
has_gpu && GPU=1
for step in $STEPS; do
    case $step in
        info) run_step info 30 step_info ;;
        kernel_vs_cudnn)
            # Runs without a GPU too: it then says it needs one and exits 0 (the dry run checks that).
            STEP_CAPTURE=$WORK/kernel_vs_cudnn.txt run_step kernel_vs_cudnn 170 \
                "$PYTHON" benchmarks/kernel_vs_cudnn.py --out "$OUT"
            ;;
        sass) run_step sass 45 step_sass ;;  # compile-only: runs without a GPU too
        tests | tune | report)
            if ((!GPU)); then
                SUMMARY+=("$(printf '%-16s %-9s %5s s  (no CUDA device)' "$step" skipped -)")
                say "=== $step: skipped (no CUDA device)"
                continue
            fi
            case $step in
                tests) run_step tests 120 step_tests ;;
                tune)
                    run_step tune 110 step_tune
                    [[ $LAST_STATUS == ok ]] && export TUNE_COMPLETE=1
                    collect_tuning_cache
                    ;;
                report) run_step report 170 step_report; collect_report ;;
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
