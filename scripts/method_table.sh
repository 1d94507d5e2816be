#!/usr/bin/env bash
# Every self-supervised method that runs on Fashion-MNIST with the small CNN, at an equal wall-clock budget
# (issue #3's table): kNN top-1, linear top-1 and the final collapse std against 1/sqrt(d), tabulated by
# sslrun-report. Not in it: cmc (its views are the Lab colour channels; grayscale is refused), clip (needs
# captions), supervised and distill (labels, a teacher run: baselines, not self-supervised), ae, vae and gan
# (generative baselines).
#
#   scripts/method_table.sh [minutes per method, default 3] [methods, default all sixteen]
#
# Each method runs with its own YAML's recipe (heads, optimizer, views). Only knobs counted in epochs or
# steps that a few-epoch budget would never reach are shortened, so that each method is itself:
#   pcl     clustering starts after 1 epoch instead of 20 (otherwise the whole run is plain MoCo v2);
#   swav    prototypes frozen for 50 steps instead of 390, feature queue from epoch 1 instead of 50;
#   dino    the last layer is not frozen (the paper freezes it for 1 of 100+ epochs), teacher temperature
#           warm-up over 1 epoch instead of 30.
# and cpc runs at batch 64, its YAML's setting for a CPU (at 256 one step encodes 256 x 36 patches and scores
# each prediction against all of them: about 25 s a step here, on one thread of a busy CPU).
# deepclusterv2 spends its first epoch filling its bank at loss 0 (solo-learn's schedule), so a budget of
# about one Fashion-MNIST epoch or less leaves it untrained.
# Environment: RUNS (run folders, default outputs/method_table), EXTRA (overrides for every run).
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-3}
methods=${2:-simclr simsiam mocov1 mocov2 mocov3 byol swav dino barlow pcl instdisc deepcluster invaspread cpc simclrv2
  deepclusterv2}
RUNS=${RUNS:-outputs/method_table}
declare -A short=(
  [pcl]="method.warmup_epochs=1"
  [swav]="method.freeze_prototypes_iters=50 method.queue_start_epoch=1"
  [dino]="method.freeze_last_layer=0 method.warmup_teacher_temp_epochs=1"
  [cpc]="trainer.batch_size=64"
)
for m in $methods; do
  # shellcheck disable=SC2086  # the override lists are word lists
  sslrun method="$m" dataset=fashion_mnist backbone=small_cnn trainer.epochs=1000 trainer.max_minutes="$minutes" \
    ${short[$m]:-} ${EXTRA:-} hydra.run.dir="$RUNS/$m"
done
python -m sslrun.report.cli "$RUNS"   # = sslrun-report: one row per method, the overrides that differ as columns
