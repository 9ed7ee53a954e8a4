#!/usr/bin/env bash
# Rebuild the shipped base model, models/base: pretrain it with chorus (configs/pretrain_base.yaml: pure SFT from
# random weights on the task-family corpus of rollout/tasks.py), then put the run's final model there with a card
# (models/base/README.md) that says what it knows, per family, and how long the build took.
#
#   ops/build_base.sh [RUN_DIR] [key=value ...]     (make base)
#
# About 30 minutes on 2 CPU cores. The same commit rebuilds the same corpus and initial weights; the result matches
# the shipped one to within the run-to-run differences of multi-threaded float32 sums.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/pretrain-base-$(date +%Y%m%d-%H%M%S)}
shift || true
start=$(date +%s)
.venv/bin/chorus train configs/pretrain_base.yaml --run-dir "$run" "$@"
seconds=$(( $(date +%s) - start ))
rm -rf models/base.new
mkdir -p models
cp -r "$run/final" models/base.new
.venv/bin/python -m rollout.base_card "$run" "$seconds" models/base.new
rm -rf models/base.old
[ ! -d models/base ] || mv models/base models/base.old
mv models/base.new models/base
rm -rf models/base.old
echo "build_base: models/base rebuilt from $run in ${seconds}s"
