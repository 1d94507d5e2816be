#!/usr/bin/env bash
# One command for the GPU figures: SimCLR / BYOL / SwAV multi-crop / DINO epoch times and peak memory on
# CIFAR-10-shaped data (ResNet-18, batch 512, bf16), SimCLR with trainer.compile=true, the ratio to the
# lightly-style reference on the same GPU, and the evaluation (features, kNN, linear) on 60,000 images.
# Prints each figure and appends them to BENCHMARKS.md with the device's name (scripts/bench_gpu.py says how).
# Estimated at 5-6 minutes on one H100/H200 (not yet timed: no GPU lent so far); it installs nothing.
#
#   scripts/bench_gpu.sh                  # on the GPU machine
#   BENCH_TOY=1 scripts/bench_gpu.sh      # CPU, toy sizes, seconds: what the test suite runs
#
# On a lent device machine (no network there: hydra, omegaconf and lightly travel as wheels). Here, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     hydra-core==1.3.2 omegaconf==2.3.0 lightly==1.6.0
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # an sdist only: built here
# then the run (carry .whl; $OUT/bench_gpu.log and the BENCHMARKS.md rows come back):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD && scripts/bench_gpu.sh 2>&1 | tee $OUT/bench_gpu.log;
#   cp BENCHMARKS.md $OUT/
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 scripts/bench_gpu.py "$@"
