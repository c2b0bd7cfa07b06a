#!/usr/bin/env bash
# GPU check of the real-checkpoint paths (issue 15), under 8 minutes on one GPU:
# a LLaVA-1.5-7B-shaped random-weight target in bf16 under sdpa and flash-attn, decoding with
# a self-draft chain, a random MSD head (MSD's 59-token tree and a 4-chain) and MaG; greedy
# mismatches against autoregressive decoding and tokens/s; then a llava-hf-format checkpoint
# loaded with dtype=auto and device_map=auto. Offline and self-contained after
#   bash launch/install.sh --gpu
# Usage: bash bench/gpu_check.sh [OUT_DIR] [extra args of python -m lmms_sd.bench.gpu_check]
#        bash bench/gpu_check.sh /tmp/gc --dry-run      # CPU, tiny shapes, about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results/gpu_check}}
shift || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "no nvidia-smi"
"$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null \
  || echo "flash_attn not importable: flash_attention_2 rows are skipped"
timeout 470 "$PY" -m lmms_sd.bench.gpu_check --out "$out" "$@"
