#!/usr/bin/env bash
# Install lmms_sd (editable) and the exact dependency set the suite was tested with.
#   bash launch/install.sh [--venv DIR [--fresh]] [--gpu] [--latest]
#     --venv DIR   install into the virtual environment DIR (created if missing); without it,
#                  into the current Python ($PYTHON or python3)
#     --fresh      delete DIR first, so the run sees exactly what a new machine sees
#     --gpu        CUDA machines: torch's CUDA build of the same release, + flash-attn, deepspeed
#     --latest     UNTESTED: newest releases within setup.py's bounds instead of the pins
#     --test       accepted for compatibility (pytest and scipy are in the pinned set)
# The pinned set is launch/constraints.txt (regenerate it with launch/lock.sh). It is installed
# with --no-deps, so pip resolves nothing: a new machine gets exactly what the suite passed on,
# and the final check fails if the environment differs from it.
# Pitfalls handled (see README): torch is installed first, constrained, or pip swaps a CPU torch
# for a multi-GB CUDA build; lmms-eval 0.7.3 needs filelock<4 (4.x has no filelock._api);
# torchvision from PyPI does not match the CPU torch and breaks every transformers model import,
# so it is not installed (transformers then uses its PIL image processors).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
LOCK=launch/constraints.txt
venv="" fresh=0 gpu=0 latest=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=${2:?--venv needs a directory}; shift ;;
    --fresh) fresh=1 ;;
    --gpu) gpu=1 ;;
    --latest) latest=1 ;;
    --test) ;;
    *) echo "install.sh: unknown option $1 (see the header of launch/install.sh)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$venv" ]; then
  [ "$fresh" = 1 ] && rm -rf "$venv"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  PY=$venv/bin/python
elif [ "$fresh" = 1 ]; then
  echo "install.sh: --fresh needs --venv DIR" >&2; exit 2
fi
pipq() { "$PY" -m pip install -q "$@"; }
t0=$SECONDS
torch_pin=$(grep -E '^torch==' "$LOCK")
if [ "$latest" = 1 ]; then
  echo "install.sh --latest: UNTESTED newest releases (the tested set is $LOCK)" >&2
  pipq "$torch_pin"
  pipq -c <(echo "$torch_pin") -e ".[test]"
  "$PY" -c "import torchvision" >/dev/null 2>&1 || "$PY" -m pip uninstall -y -q torchvision || true
else
  # torch first, with its own dependencies at the pinned versions (on a CUDA machine the
  # nvidia-* runtime wheels of that build come with it), then exactly the pinned set.
  pipq -c "$LOCK" "$torch_pin"
  pipq --no-deps -r "$LOCK"
  pipq --no-deps -e .
fi
if [ "$gpu" = 1 ]; then
  pipq -c <(echo "$torch_pin") deepspeed
  pipq --no-build-isolation flash-attn
fi
if [ "$latest" = 0 ] && [ "$gpu" = 0 ]; then
  # The environment must be exactly the tested one (nothing more, nothing less, same versions).
  if ! diff <("$PY" -m pip freeze --exclude-editable | grep -viE '^lmms[-_]sd[=@ ]' \
                | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/' | LC_ALL=C sort -f) \
            <(grep -v '^#' "$LOCK"); then
    echo "install.sh: the environment differs from $LOCK (lines above; < installed, > pinned)." \
         "Use --venv DIR --fresh for a clean environment." >&2
    exit 1
  fi
fi
"$PY" -c "import lmms_sd, torch, transformers, lmms_eval, filelock; print('lmms_sd ready:', \
'torch', torch.__version__, '| transformers', transformers.__version__, '| lmms-eval', \
lmms_eval.__version__ if hasattr(lmms_eval, '__version__') else '0.7.3', '| filelock', filelock.__version__)"
echo "install.sh: $((SECONDS - t0)) s (python: $PY)"
