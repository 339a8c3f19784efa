#!/usr/bin/env bash
# Downstream fine-tuning on a shifted toy domain (paper Fig. 7-8 in miniature): continue Stage 1
# from a toy AnyFlow folder on "your own clips" of colours the teacher never saw.
#   bash scripts/downstream_demo.sh <anyflow folder> <work dir> [steps]
set -euo pipefail
MODEL=$1; WORK=$2; STEPS=${3:-200}
SHIFT=magenta,cyan,white
export HF_HUB_OFFLINE=1
A=.venv/bin/anystep
python=.venv/bin/python
$python scripts/make_toy_clips.py --out "$WORK/clips" --n 512 --colors $SHIFT
$A encode --model "$MODEL" --clips "$WORK/clips" --out "$WORK/shards"
$A eval --model "$MODEL" --colors $SHIFT --steps 1,4,32 --out "$WORK/before_shifted"
$A train stage1 --config configs/toy/stage1.yaml init="$MODEL" data="$WORK/shards" steps=$STEPS out="$WORK/finetune"
$A eval --model "$WORK/finetune/model" --colors $SHIFT --steps 1,4,32 --out "$WORK/after_shifted"
$A eval --model "$MODEL" --steps 1,4,32 --out "$WORK/before_original"
$A eval --model "$WORK/finetune/model" --steps 1,4,32 --out "$WORK/after_original"
