#!/usr/bin/env bash
# Every CUDA path of toe in one short run (under 10 minutes on one GPU): AMP bf16 and fp16 with its scaler, fused
# AdamW, torch.compile, DDP over nccl, the DALI pipeline with decoding on the GPU and on the CPU, auto's choice of
# it, toe-bench step and capacity, and short toe-train runs on a JPEG folder it writes. One line per check; the
# figures go to gpu-check.json (or --out FILE). Without CUDA the GPU checks skip with the reason and the CPU ones
# run (CI runs it so). Usage: bash scripts/gpu-check.sh [--out FILE] [--budget SECONDS] [--only CHECK ...]
set -euo pipefail
exec python3 -m toe.bench.gpu_check "$@"
