#!/usr/bin/env bash
# Everything a GPU session measures, in one run (about 10 minutes on one H200): the parity table of
# the GPU kernels, then training throughput of both trainers against transformers + torch.compile
# with the default settings and with each lever of bench/NOTES.md. JSON lands in bench/results/.
#   bash bench/gpu_session.sh 2>&1 | tee bench/results/gpu_session.log
set -uo pipefail
cd "$(dirname "$0")/.."
run() { echo "+ $*"; "$@" || echo "FAILED: $*"; }
FAST_XLA="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true"

run python bench/parity_gpu.py
run python bench/train_throughput.py                                      # defaults, 3 contenders
XLA_FLAGS="$FAST_XLA" run python bench/train_throughput.py --only jax_trainer --tag xla_flags
XLA_FLAGS="$FAST_XLA" run python bench/train_throughput.py --only jax_trainer --tag remat_dots --remat dots
XLA_FLAGS="$FAST_XLA" run python bench/train_throughput.py --only jax_trainer --tag scan --scan-layers
XLA_FLAGS="$FAST_XLA" run python bench/train_throughput.py --only jax_trainer --tag chunk2048 --loss-chunk 2048
XLA_FLAGS="$FAST_XLA" run python bench/train_throughput.py --only jax_trainer --tag batch12_dots --batch 12 --remat dots
run python bench/train_throughput.py --only torch_trainer --tag chunk2048 --loss-chunk 2048
