#!/usr/bin/env bash
# Install, then the main job on the embedded default: an offline lmms-eval run of a speculative
# model class on the shipped shapes models, printing accuracy and measured speedup.
#   bash launch/demo.sh                       # defaults of python -m lmms_sd.demo
#   bash launch/demo.sh --model llava_sd --limit 48
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec "${PYTHON:-python3}" -m lmms_sd.demo "$@"
