#!/usr/bin/env bash
# The GPU measurements of docs/performance.md ("GPU") as ONE prepared run for a CUDA machine,
# sized for a lent H200 session (15 minutes of device time in all, 10 per command, machine start
# included): it stops starting steps after BUDGET_S seconds and ends by HARD_S (default 450 s).
#
#   1. the CUDA tests of the fast paths (tests/test_fast.py -k cuda);
#   2. statten bench, eager fp32 versus fast, for the two goals first (sdt CIFAR-10 2-512 at
#      batch 64, sdt ImageNet 8-768 at batch 32; goal: training >= 2x the eager fp32 baseline),
#      then one CIFAR-10 and one ImageNet recipe of each other family (spikformer, qkformer,
#      sdtv2; their STAtten variants, ImageNet at the recipe's own batch);
#   3. optional, last: the two goals again with --compile (torch.compile of the whole model; fast
#      mode only, compared with the eager run of step 2).
#
# On CUDA, bench's fast mode is: bf16 autocast, channels-last weights and inputs, fused LIF
# kernels compiled by torch.compile (Triton), memory-efficient training (1-byte spike storage),
# BatchNorm folded for inference; eager is the plain fp32 model with SpikingJelly's own GPU
# neurons. Each step keeps going when another fails; failures, time-outs and steps skipped for
# the time budget are listed at the end and make the exit status 1. The summary table (train and
# inference speedup, peak-memory ratio per recipe; benchmarks/gpu_summary.py) is printed last and
# written to OUT_DIR/summary.md.
#
# Usage, from the repository root (statten runs from this checkout, through PYTHONPATH):
#
#     bash benchmarks/gpu_checks.sh [OUT_DIR] [extra statten bench flags]
#
# OUT_DIR (default gpu-results/) receives gpu.txt, env.txt, steps.tsv, one <step>.json and
# <step>.log per step, log.txt and summary.md; with ARCHIVE=FILE.tar.gz the folder is also packed
# into FILE after every step (so a run cut short still returns what it measured, as one file).
#
# The device machine has PyTorch, Triton, timm, pytest, PyYAML, NumPy, scikit-learn, TensorBoard,
# tqdm and matplotlib, but not SpikingJelly, nor loguru (which SpikingJelly imports), nor statten.
# Carry them as wheels (all pure Python, ~1.2 MB). Here, once (no build isolation, no network
# needed for the statten wheel; spikingjelly and loguru at the versions of .venv):
#
#     echo /.whl/ >> .git/info/exclude
#     .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .whl \
#         spikingjelly==2.0.0 loguru==0.7.3
#     .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl .   # optional: statten
#
# and on the device machine (carry [".whl"]; the script installs every .whl/*.whl with
# pip install --no-index --no-deps into /tmp/statten-site and puts it on PYTHONPATH, after the
# checkout, so the checkout's statten is the one measured):
#
#     ARCHIVE=$OUT/gpu-results.tar.gz bash benchmarks/gpu_checks.sh /tmp/gpu-results
#
# with timeout_s 540. Environment overrides (for a CPU smoke run, or a rerun of some steps):
#   PYTHON (python3, or .venv/bin/python where it exists)  DEVICE (cuda)  WHEELS (.whl)
#   ONLY (extended regex: run only the steps whose name matches)  SKIP_TESTS=1  SKIP_COMPILE=1
#   BATCH (one batch size for every step)  REPEATS, WARMUP (for every step)
#   BENCH_FLAGS (extra bench flags, e.g. "--dim 32 --layer 1 --eager-kernels")
#   BUDGET_S (420: no step starts after it)  HARD_S (450: every step is cut there)
#   DRY_RUN=1 (print each step's command, run nothing)
# e.g. DEVICE=cpu ONLY=sdt-cifar10 BATCH=2 REPEATS=1 WARMUP=0 SKIP_TESTS=1 \
#      BENCH_FLAGS="--dim 64 --layer 1" bash benchmarks/gpu_checks.sh /tmp/smoke
set -uo pipefail  # not -e: a failing step is recorded and the next one runs
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
shift || true
extra=("$@")
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}
WHEELS=${WHEELS:-.whl}
BUDGET_S=${BUDGET_S:-420}
HARD_S=${HARD_S:-450}
read -r -a bench_flags <<<"${BENCH_FLAGS:-}"
mkdir -p "$out"
: >"$out/steps.tsv"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=/tmp/statten-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl || echo "gpu_checks: installing $WHEELS/*.whl failed"
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=()
skipped=()

pack() {
    if [ -n "${ARCHIVE:-}" ]; then
        tar -czf "$ARCHIVE.tmp" -C "$(dirname "$out")" "$(basename "$out")" &&
            mv "$ARCHIVE.tmp" "$ARCHIVE"
    fi
}

# run_step NAME EST_S TIMEOUT_S COMMAND...: run COMMAND unless filtered out or out of time; cut
# it at TIMEOUT_S or at HARD_S; record NAME, status and seconds in steps.tsv.
run_step() {
    local name=$1 est=$2 limit=$3
    shift 3
    if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return 0; fi
    if [ -n "${DRY_RUN:-}" ]; then
        printf 'step %s:' "$name"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    local left=$((HARD_S - SECONDS))
    if ((SECONDS + est > BUDGET_S || left < 20)); then
        echo "== $name: skipped (${SECONDS}s elapsed, budget ${BUDGET_S}s, estimate ${est}s)"
        skipped+=("$name")
        printf '%s\tskipped\t0\n' "$name" >>"$out/steps.tsv"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at ${SECONDS}s, limit ${limit}s): $*"
    local start=$SECONDS status
    # timeout signals its whole process group: bench's worker processes and compile workers too.
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    if ((status == 0)); then
        printf '%s\tok\t%d\n' "$name" "$took" >>"$out/steps.tsv"
    else
        [ "$status" = 124 ] || [ "$status" = 137 ] && status="timed out"
        echo "== $name: FAILED ($status) after ${took}s"
        failed+=("$name")
        printf '%s\tfailed (%s)\t%d\n' "$name" "$status" "$took" >>"$out/steps.tsv"
    fi
    pack
}

# `statten` from this checkout, without a console script (run_step runs it under timeout).
cli='import sys; from statten.cli import main; sys.exit(main())'

# bench NAME EST_S TIMEOUT_S RECIPE BATCH REPEATS WARMUP [bench flags]
bench() {
    local name=$1 est=$2 limit=$3 recipe=$4 batch=${BATCH:-$5} repeats=${REPEATS:-$6}
    local warmup=${WARMUP:-$7}
    shift 7
    run_step "$name" "$est" "$limit" "$PYTHON" -c "$cli" bench -c "$recipe" -b "$batch" --device "$DEVICE" \
        --repeats "$repeats" --warmup "$warmup" --json "$out/$name.json" "$@" \
        ${bench_flags[@]+"${bench_flags[@]}"} ${extra[@]+"${extra[@]}"}
}

if [ -z "${DRY_RUN:-}" ]; then
    {
        date -u +"date %Y-%m-%dT%H:%M:%SZ"
        echo "device $DEVICE, python $PYTHON"
        "$PYTHON" - <<'EOF'
import importlib.metadata as md
import torch
for name in ("torch", "triton", "timm", "spikingjelly", "loguru", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
EOF
    } | tee "$out/env.txt"
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    fi
fi

# 1. CUDA tests of the fast paths (skipped, not failed, where CUDA is missing).
[ -n "${SKIP_TESTS:-}" ] ||
    run_step cuda-tests 40 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fast.py -k cuda

# 2. statten bench, eager fp32 versus fast. The goals first.
bench sdt-cifar10-2-512-b64 70 150 conf/cifar10/2_512_200E_t4.yml 64 10 3
bench sdt-imagenet-8-768-b32 90 180 conf/imagenet/8_768_200E_t4.yml 32 10 3
bench spikformer-cifar10-4-384-b64 45 120 conf/spikformer/cifar10_4_384_300E_t4_statten.yml 64 5 2
bench qkformer-cifar10-4-384-b64 45 120 conf/qkformer/cifar10_hst_4_384_400E_t4_statten.yml 64 5 2
bench sdtv2-cifar10-8-256-b64 45 120 conf/sdtv2/cifar10_8_256_t4_statten.yml 64 5 2
bench spikformer-imagenet-8-768-b24 60 150 conf/spikformer/imagenet_8_768_300E_t4_statten.yml 24 5 2
bench qkformer-imagenet-10-384-b32 60 150 conf/qkformer/imagenet_hst_10_384_200E_t4_statten.yml 32 5 2
bench sdtv2-imagenet-15m-t4-b24 60 150 conf/sdtv2/imagenet_15m_t4_kd_statten.yml 24 5 2

# 3. Optional: torch.compile of the whole fast model (compiling takes most of the time).
if [ -z "${SKIP_COMPILE:-}" ]; then
    bench sdt-cifar10-2-512-b64-compile 90 150 conf/cifar10/2_512_200E_t4.yml 64 10 3 \
        --compile --modes fast
    bench sdt-imagenet-8-768-b32-compile 120 150 conf/imagenet/8_768_200E_t4.yml 32 10 3 \
        --compile --modes fast
fi

[ -n "${DRY_RUN:-}" ] && exit 0
echo "== summary (${SECONDS}s)"
"$PYTHON" benchmarks/gpu_summary.py "$out" | tee "$out/summary.md" || failed+=(summary)
pack
if ((${#failed[@]} + ${#skipped[@]})); then
    echo "gpu_checks: failed: ${failed[*]:-none}; skipped for time: ${skipped[*]:-none}"
    exit 1
fi
echo "gpu_checks: all steps ok in ${SECONDS}s"
