#!/usr/bin/env bash
# The main job: train ResNet-18 on Fashion-MNIST on 2 CPU processes with Trainer(strategy="cmp").
#   bash scripts/main.sh [python -m lightning_cmp.quickstart args...]   (see --help)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[data] installing Debian package dataset-fashion-mnist"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    else
        echo "[data] $data missing and not root: the data module will try torchvision's download into ./data"
    fi
fi

exec python -m lightning_cmp.quickstart "$@"
