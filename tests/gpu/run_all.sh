#!/usr/bin/env bash
# Every GPU check on one CUDA device (<= 8 minutes): the gpu-marked tests and the pretraining,
# SFT and DPO throughput benchmarks, written up as gpu-card/card.json and card.md.
#   bash tests/gpu/run_all.sh [--out DIR] [--budget SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python tests/gpu/card.py "$@"
