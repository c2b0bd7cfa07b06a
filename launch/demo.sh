#!/usr/bin/env bash
# Install (into .venv, created on first use), then the main job on the embedded default: an
# offline lmms-eval run of a speculative model class on the shipped shapes models, printing
# accuracy and the measured speedup over autoregressive decoding in the same run.
#   bash launch/demo.sh                       # defaults of python -m lmms_sd.demo
#   bash launch/demo.sh --model llava_sd --limit 48
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh --venv .venv
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m lmms_sd.demo "$@"
