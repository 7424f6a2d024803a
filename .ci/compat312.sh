#!/usr/bin/env bash
# Compatibility stage: everything that touches megatron-core, on Python 3.12 with the newest
# megatron-core 0.19.x (the main stage covers Python 3.11 + megatron-core 0.16.1).
#
# Builds a fresh virtual environment the way a user would on a new machine -- torch from the
# package index, then megatron-core, then sfmed with its dependencies -- runs the quickstart and
# the tests marked `mcore_compat`, and removes the environment again. Nothing is cached between
# runs. Set SFMED_COMPAT_VENV=<dir> to keep (and on later runs reuse) the environment there.
# SFMED_OTHER_PYTHON=<python with megatron-core 0.16.1 and sfmed's dependencies> (set by .ci/run)
# enables the test that resumes checkpoints across the two releases.
set -euo pipefail
cd "$(dirname "$0")/.."

pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
py312=$(ls -d "$pyenv_root"/versions/3.12*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$py312" ]; then
  echo "compat stage SKIPPED: pyenv has no Python 3.12 under $pyenv_root/versions" \
    "(install one with 'pyenv install 3.12' to run it)"
  exit 0
fi

venv=${SFMED_COMPAT_VENV:-}
if [ -z "$venv" ]; then
  venv=$(mktemp -d -t sfmed-compat312.XXXXXX)
  trap 'rm -rf "$venv"' EXIT
fi
export PIP_NO_CACHE_DIR=1 # a fresh machine has no pip cache; leave no 6 GB one behind either

stage() { echo; echo "== compat312: $* ($(date +%T))"; }
t0=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  stage "venv from $py312 in $venv"
  "$py312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  stage "torch from the package index"
  "$venv/bin/python" -m pip install -q torch
  stage "megatron-core 0.19.x"
  "$venv/bin/python" -m pip install -q "megatron-core>=0.19,<0.20"
  stage "sfmed and its dependencies"
  "$venv/bin/python" -m pip install -q -e ".[test]"
fi
t_install=$((SECONDS - t0))
"$venv/bin/python" - <<'PY'
import sys
from importlib.metadata import version

import torch

mc = version("megatron-core")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {mc}, "
      f"transformers {version('transformers')}")
if not mc.startswith("0.19."):
    sys.exit(f"compat stage needs megatron-core 0.19.x, got {mc}")
PY
if [ -n "${SFMED_OTHER_PYTHON:-}" ]; then
  echo "other release for the cross-release test: $("$SFMED_OTHER_PYTHON" -c \
    'from importlib.metadata import version; print(version("megatron-core"))') ($SFMED_OTHER_PYTHON)"
fi

stage "launch/quickstart.py"
t1=$SECONDS
"$venv/bin/python" launch/quickstart.py
stage "pytest -m mcore_compat"
"$venv/bin/python" -m pytest -q -m mcore_compat --durations=10 tests
echo "compat312: install ${t_install}s ($(du -sh "$venv" | cut -f1)), tests $((SECONDS - t1))s"
