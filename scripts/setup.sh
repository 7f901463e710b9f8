#!/usr/bin/env bash
# Creates .venv (if missing) and installs meshweave editable with its test extras.
# Idempotent; safe to re-run. Needs Python >= 3.11 ($PYTHON, default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: need Python >= 3.11 (set PYTHON=...); got: $("$PYTHON" --version 2>&1 || true)" >&2
    exit 1
  fi
  # Debian's python3 lacks ensurepip until python3-venv is installed.
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup.sh: installing python3-venv"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      echo "setup.sh: $PYTHON has no venv/ensurepip (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  echo "setup.sh: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q --upgrade pip
# setuptools + wheel: the [build-system] requirements, needed in the venv itself
# by `bazel build //:wheel` (it builds without isolation, offline).
"$VENV/bin/python" -m pip install -q 'setuptools>=64' wheel
"$VENV/bin/python" -m pip install -q -e '.[test]'
echo "setup.sh: $VENV ready ($("$VENV/bin/python" --version 2>&1), meshweave $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("meshweave"))'))"
