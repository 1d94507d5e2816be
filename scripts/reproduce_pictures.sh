#!/usr/bin/env bash
# The README's two pictures, from real runs on Fashion-MNIST on CPU (each run a few minutes on 2 cores):
#   simsiam  SimSiam with vs without stop-gradient (Chen & He, 2021, Fig. 2): loss, collapse std, kNN.
#   mocov3   MoCo v3 + ViT at a deliberately high lr, patch projection trained vs frozen (Chen, Xie & He,
#            2021, Fig. 4): first-layer gradient magnitude with its spikes, against the kNN curve.
#
#   scripts/reproduce_pictures.sh [simsiam|mocov3|all]
#
# Environment: OUT (PNG folder, default docs/figures), RUNS (run folders, default outputs/pictures), and
# SIMSIAM_IMAGES/SIMSIAM_EPOCHS, MOCO_IMAGES/MOCO_EPOCHS (the budget: a subset and epochs over it, so every
# run of a picture covers the same steps), VIT (backbone overrides of the MoCo v3 runs).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-docs/figures}
RUNS=${RUNS:-outputs/pictures}
SIMSIAM_IMAGES=${SIMSIAM_IMAGES:-10240}   # 40 steps per epoch at batch 256
SIMSIAM_EPOCHS=${SIMSIAM_EPOCHS:-15}
MOCO_IMAGES=${MOCO_IMAGES:-6400}          # 100 steps per epoch at batch 64
MOCO_EPOCHS=${MOCO_EPOCHS:-2}
# vit_tiny's recipe (patch 4 on 28 px: 49 tokens + CLS, sin-cos positions) cut to 4 blocks of width 96: a
# full vit_tiny step takes ~20 s on 2 CPU cores, this one ~1 s. VIT="" runs the full vit_tiny.
VIT=${VIT-backbone.depth=4 backbone.embed_dim=96}
# Hydra names a multirun job's folder after its overrides; the job number keeps it short. sslrun-plot
# labels each run by its own overrides (.hydra/overrides.yaml), so nothing is lost.
short='hydra.sweep.subdir=${hydra.job.num}'

if [[ $what == simsiam || $what == all ]]; then
  # The ablation only changes method.stop_gradient. CPU-sized heads (512-d, predictor bottleneck 128) and
  # a high lr with weight decay on every weight (the official code decays BN parameters too) make the
  # no-stop-gradient run collapse within a few hundred steps instead of thousands.
  sslrun -m method=simsiam method.stop_gradient=true,false dataset=fashion_mnist backbone=small_cnn \
    dataset.limit_train="$SIMSIAM_IMAGES" trainer.epochs="$SIMSIAM_EPOCHS" trainer.batch_size=256 \
    method.proj_hidden_dim=512 method.proj_output_dim=512 method.pred_hidden_dim=128 \
    optimizer.lr=1.0 optimizer.exclude_bias_norm=false \
    trainer.log_every=5 monitor.knn_every_steps=20 monitor.knn_bank_size=2000 monitor.knn_query_size=1000 \
    eval.linear.epochs=20 hydra.sweep.dir="$RUNS/simsiam" "$short"
  sslrun-plot "$RUNS/simsiam" -o "$OUT/simsiam_stop_gradient.png" --panels loss,std,knn,rank \
    --title "SimSiam on Fashion-MNIST: with vs without stop-gradient"
fi

if [[ $what == mocov3 || $what == all ]]; then
  # lr 0.1 x 64/256 with no warmup is ~10x MoCo v3's stable lr for this model: gradient spikes appear.
  # log_every=1 writes every step's gradient magnitude; the kNN monitor runs every 10 steps.
  # shellcheck disable=SC2086  # VIT is a list of overrides
  sslrun -m method=mocov3 backbone=vit_tiny backbone.patch_size=4 backbone.frozen_patch_embed=false,true $VIT \
    dataset=fashion_mnist dataset.limit_train="$MOCO_IMAGES" trainer.epochs="$MOCO_EPOCHS" trainer.batch_size=64 \
    method.proj_hidden_dim=512 method.pred_hidden_dim=512 optimizer=adamw optimizer.lr=0.1 \
    optimizer.warmup_epochs=0 trainer.log_every=1 monitor.knn_every_steps=10 monitor.knn_bank_size=1000 \
    monitor.knn_query_size=500 eval.linear.epochs=20 hydra.sweep.dir="$RUNS/mocov3" "$short"
  sslrun-plot "$RUNS/mocov3" -o "$OUT/mocov3_spikes.png" --panels grad,knn,loss \
    --title "MoCo v3 + ViT on Fashion-MNIST at a high lr: gradient spikes and the kNN curve"
fi
