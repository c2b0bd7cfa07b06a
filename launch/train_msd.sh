#!/usr/bin/env bash
# MSD draft heads on real data: MSD's recipe (Lyn-Lucy/MSD EAGLE/eagle/train/main_deepspeed.py and
# ds_config.json) under accelerate + DeepSpeed ZeRO-2, one process per GPU.
#
#   launch/train_msd.sh RECIPE TARGET_DIR DATA_DIR OUT_DIR [more lmms_sd.train.msd flags]
#
# RECIPE      llava-7b | llava-13b | qwen2vl-7b (the flags are the same; TARGET_DIR sets the family)
# TARGET_DIR  a local snapshot of llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf or
#             Qwen/Qwen2-VL-7B-Instruct (hf download REPO --local-dir TARGET_DIR)
# DATA_DIR    ShareGPT_V4.3_unfiltered_cleaned_split.json (text-only phase),
#             llava_v1_5_mix665k.json (multimodal phase) and image_data/ with coco/train2017,
#             gqa/images, ocr_vqa/images, textvqa/train_images, vg/VG_100K{,_2}
# NUM_GPUS    processes (default 8). A killed run continues with the same command + --resume.
#
# Recipe: AdamW lr 5e-5, betas (0.9, 0.95), no weight decay, warmup 2000 steps, 40 epochs over
# mix665k (first half text-only, then ramping to multimodal), gradient clip 0.5, uniform feature
# noise 0.2, 2048 tokens, target in bf16. MSD runs 2 conversations per GPU with 2 accumulation
# steps; without accumulation we run 4 per GPU (the same samples per optimiser step; 8 GPUs x 4
# x 20.8k steps/epoch x 40 epochs ~ MSD's total_steps 800000). The head trains in fp32.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '5,13p' "$0"; exit 2; fi
recipe=$1 target=$2 data=$3 out=$4
shift 4
case "$recipe" in llava-7b|llava-13b|qwen2vl-7b) ;; *) echo "unknown recipe $recipe" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m accelerate.commands.launch \
    --config_file launch/accelerate_deepspeed_zero2.yaml --num_processes "${NUM_GPUS:-8}" \
    -m lmms_sd.train.msd --target "$target" --out "$out" \
    --text-data "$data/ShareGPT_V4.3_unfiltered_cleaned_split.json" \
    --mm-data "$data/llava_v1_5_mix665k.json" --image-folder "$data/image_data" \
    --epochs 40 --batch-size 4 --lr 5e-5 --warmup-steps 2000 --beta2 0.95 --weight-decay 0 \
    --grad-clip 0.5 --noise 0.2 --max-length 2048 --text-phase 0.5 --dtype bfloat16 \
    --save-every 2000 --log-every 100 --threads 4 --eval-items 0 "$@"
