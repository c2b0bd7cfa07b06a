#!/usr/bin/env bash
# Install with test extras and run the whole suite offline (about N minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh --test
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest -q -ra tests "$@"
