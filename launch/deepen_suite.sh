#!/usr/bin/env bash
# Rebuild one family's shipped shapes suite at the real models' depth (LLaVA-1.5-7B: 32 decoder
# layers, Qwen2-VL-7B: 28): deepen the trained target, then every model bound to it continues
# from its weights against the deep target (draft VLM, text-only draft, MSD head), then the
# head's calibrator is refitted and the cards, metrics and msd_metrics are rewritten.
#   bash launch/deepen_suite.sh llava|qwen2_vl
# Resumable: each finished step leaves a marker in runs/deepen_<family>/, and the training steps
# checkpoint; rerun the same command after a kill. 1 torch thread per process (2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
family=${1:?usage: bash launch/deepen_suite.sh llava|qwen2_vl}
PY=${PYTHON:-python}
out=lmms_sd/assets/shapes/$family
marks=runs/deepen_$family
mkdir -p "$marks"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
step() {  # step NAME COMMAND...: run once
  local name=$1; shift
  [ -e "$marks/$name" ] && { echo "== $name: done earlier"; return; }
  echo "== $name: $*"; local t0=$SECONDS
  "$@"
  echo "$((SECONDS - t0))" > "$marks/$name"; echo "== $name: $((SECONDS - t0)) s"
}
step deepen "$PY" -m lmms_sd.train.shapes_models --family "$family" --out "$out" \
  --stages deepen --deepen-steps "${DEEPEN_STEPS:-60}"
step drafts "$PY" -m lmms_sd.train.shapes_models --family "$family" --out "$out" \
  --stages draft_vlm,text_only --warm-start --draft-steps "${DRAFT_STEPS:-60}" \
  --draft-batch-size "${DRAFT_BATCH:-32}" --cards model_cards
resume=(); [ -d "$out/msd_head_deep/state" ] && resume=(--resume)
step head "$PY" -m lmms_sd.train.msd --target "$out/target" --init "$out/msd_head" \
  --out "$out/msd_head_deep" --steps "${HEAD_STEPS:-300}" --batch-size 16 --lr 1e-3 \
  --threads 1 --eval-items 16 ${resume[@]+"${resume[@]}"}
step head_swap bash -c "rm -rf '$out/msd_head' && mv '$out/msd_head_deep' '$out/msd_head'"
step compare "$PY" -m lmms_sd.train.msd_compare --family "$family" --cards model_cards
step traces "$PY" -m lmms_sd.calibration.collect --target "$out/target" --head "$out/msd_head" \
  --items 60 --split train --out "$marks/traces.jsonl"
step calibrator "$PY" -m lmms_sd.calibration.cli fit --traces "$marks/traces.jsonl" \
  --out "$out/calibrator_msd_head.json" --plot "$out/calibrator_msd_head.png"
echo "deepen_suite $family: done"
