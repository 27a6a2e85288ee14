#!/usr/bin/env bash
# Create (or bring up to date) the separate virtual environment that runs the MONAI Label server.
#
# MONAI Label 0.8.5 declares heavy dependencies (torchvision, itk, SimpleITK, pydicom-seg, sam2, ...) that it does
# not need to serve a local bundle, and torchvision would replace the CPU torch with a CUDA build. So this script
# installs torch==2.13.0 first, then the project's "[label]" extra (a light, explicit list), then monailabel with
# --no-deps, and checks that torch is still 2.13.0 and that torchvision is absent. The modules it leaves out are
# replaced at server start by `amat_monai.label.compat` with stand-ins that raise if they are ever used.
#
# Usage: bash scripts/install_label_env.sh [VENV_DIR]   (default: .venv-label in the project root)
# Idempotent: a stamp file records the inputs' checksum and a second run with the same inputs does nothing.
# Extra pip arguments for the torch install (e.g. a CPU wheel index) can be given in AMAT_TORCH_PIP_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${1:-$ROOT/.venv-label}"
PYTHON="${PYTHON:-python3}"
MONAILABEL_VERSION="0.8.5"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.amat-label-installed"

want="$(cat pyproject.toml scripts/install_label_env.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
    echo "install_label_env: $VENV is up to date"
    exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet)
"${PIP[@]}" install --upgrade pip
# shellcheck disable=SC2086
"${PIP[@]}" install "torch==$TORCH_VERSION" ${AMAT_TORCH_PIP_ARGS:-}
# The project and its light "[label]" extra; torch is already satisfied, so pip keeps the CPU build.
"${PIP[@]}" install -e ".[label,test]"
# monailabel itself without its declared dependencies (see the header).
"${PIP[@]}" install --no-deps "monailabel==$MONAILABEL_VERSION"

"$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import importlib.util
import sys

import torch

want = sys.argv[1]
if not torch.__version__.startswith(want):
    sys.exit(f"install_label_env: torch {torch.__version__} was installed, expected {want}")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("install_label_env: torchvision is installed; it must not be (it replaces the CPU torch)")
import monailabel  # noqa: F401  (fails here, not at server start, when the install is broken)

print(f"install_label_env: torch {torch.__version__}, monailabel {monailabel.__version__}")
PY
echo "$want" > "$STAMP"
echo "install_label_env: ready: $VENV"
