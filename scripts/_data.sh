# Sourced by main.sh and test.sh: make sure the real Fashion-MNIST files (Debian package) are there.
# As root with apt-get it installs the package `dataset-fashion-mnist`; otherwise it says what happens instead.
# shellcheck shell=bash

_data=/usr/share/datasets/fashion-mnist
if [ ! -f "$_data/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[data] installing Debian package dataset-fashion-mnist"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    else
        echo "[data] $_data missing and not root: the data module will try torchvision's download into ./data"
    fi
fi
unset _data
