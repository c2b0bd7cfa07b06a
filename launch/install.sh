#!/usr/bin/env bash
# Install lmms_sd (editable) and its dependencies. Safe to re-run; fast when all is present.
#   bash launch/install.sh          # runtime dependencies
#   bash launch/install.sh --test   # + pytest and scipy
#   bash launch/install.sh --gpu    # + flash-attn and deepspeed (CUDA machines)
# Pitfalls handled (see README): torch is installed FIRST and pinned while the rest resolves,
# or pip replaces a CPU torch by a multi-GB CUDA build; lmms-eval pulls a torchvision built for
# another torch, which breaks every transformers model import, so a torchvision that cannot
# import is removed (transformers then uses its PIL image processors).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
extras=()
for a in "$@"; do
  case "$a" in
    --test) extras+=(pytest scipy) ;;
    --gpu) extras+=(flash-attn deepspeed) ;;
    *) echo "install.sh: unknown option $a" >&2; exit 2 ;;
  esac
done
pipq() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

"$PY" -c "import torch" 2>/dev/null || pipq "torch==2.13.0"
constraints=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
pipq -c "$constraints" "lmms-eval==0.7.3" "transformers>=5" accelerate pillow safetensors \
  scikit-learn tqdm matplotlib pandas pyarrow ${extras[@]+"${extras[@]}"}
if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
  "$PY" -m pip uninstall -y -q torchvision >/dev/null 2>&1 || true
fi
pipq --no-deps -e .
rm -f "$constraints"
"$PY" -c "import lmms_sd, torch, transformers, lmms_eval; print('lmms_sd ready: torch', torch.__version__, '| transformers', transformers.__version__)"
