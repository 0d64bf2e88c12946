#!/usr/bin/env bash
# The GPU measurements of docs/performance.md ("GPU"), as one prepared run for a CUDA machine:
# the CUDA tests of the fast paths, then statten bench (eager fp32 versus fast: bf16 autocast,
# channels-last, Triton LIF kernels) for CIFAR-10 2-512 at batch 64 and ImageNet 8-768 at
# batch 32. Run from the repository root with statten installed:
#
#     bash benchmarks/gpu_checks.sh [OUT_DIR] [extra statten bench flags, e.g. --compile]
#
# Writes OUT_DIR/*.json (default gpu-results/) and prints the tables. Written and checked on
# CPU only (no GPU was available): the commands are those used on CPU, with --device cuda.
set -euo pipefail
out=${1:-gpu-results}
shift || true
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_fast.py -k cuda
statten bench -c conf/cifar10/2_512_200E_t4.yml -b 64 --device cuda --repeats 10 \
    --json "$out/cifar10_2_512_b64.json" "$@"
statten bench -c conf/imagenet/8_768_200E_t4.yml -b 32 --device cuda --repeats 10 \
    --json "$out/imagenet_8_768_b32.json" "$@"
