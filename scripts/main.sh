#!/usr/bin/env bash
# The main job: train ResNet-18 on Fashion-MNIST on 2 CPU processes with Trainer(strategy="cmp").
#   bash scripts/main.sh [python -m lightning_cmp.quickstart args...]   (see --help)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/_venv.sh"
source "$here/_data.sh"

exec python -m lightning_cmp.quickstart "$@"
