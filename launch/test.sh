#!/usr/bin/env bash
# Install the tested dependency set into a FRESH virtual environment (.venv-test, rebuilt on
# every run, so a green run means a new machine works), then run the whole suite offline.
#   bash launch/test.sh [pytest args]       (LMMS_SD_TEST_VENV=DIR to use another folder)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LMMS_SD_TEST_VENV:-.venv-test}
bash launch/install.sh --venv "$venv" --fresh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/$venv/bin:$PATH"
exec "$venv/bin/python" -m pytest -q -ra tests "$@"
