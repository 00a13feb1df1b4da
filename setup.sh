#!/usr/bin/env bash
# Install everything flwr-gkt needs on a fresh Debian machine: the offline
# Fashion-MNIST files (Debian package dataset-fashion-mnist) and a virtual
# environment .venv with the pinned torch / torchvision / flwr and the check tools
# (ruff, mypy, pre-commit); `make` for `make check`.
set -euo pipefail
cd "$(dirname "$0")"

apt_packages=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_packages+=(dataset-fashion-mnist)
command -v make >/dev/null || apt_packages+=(make)  # `make check`
if [ ${#apt_packages[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${apt_packages[@]}"
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
