#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine: a virtual environment in .venv with
# the package and its test extras, and the Fashion-MNIST data: the Debian package
# dataset-fashion-mnist when this machine allows apt-get, else a download into msn's cache.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$python" -m venv .venv
fi
echo "[setup] installing msn and its test extras into .venv (torch is the large part: about a minute)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

data=/usr/share/datasets/fashion-mnist
if [ ! -d "$data" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "[setup] warning: could not install dataset-fashion-mnist; tests that need it will be skipped"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    echo "[setup] installing Fashion-MNIST (sudo apt-get install dataset-fashion-mnist)"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "[setup] warning: could not install dataset-fashion-mnist; tests that need it will be skipped"
  else
    echo "[setup] $data is missing and apt-get is not available to this user"
  fi
fi
if [ ! -d "$data" ]; then
  echo "[setup] fetching Fashion-MNIST into the cache instead (torchvision's mirror, md5-checked)"
  .venv/bin/python -c "from msn.data import prepare_fashion_mnist; print('[setup] Fashion-MNIST in', prepare_fashion_mnist())" \
    || echo "[setup] warning: no Fashion-MNIST: install the Debian package dataset-fashion-mnist, or run make setup with network access"
fi
echo "[setup] done: $(.venv/bin/python -c 'import torch, timm, hydra; print(f"torch {torch.__version__}, timm {timm.__version__}, hydra {hydra.__version__}")')"
