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
#
#   .ci/compat312.sh            install (unless SFMED_COMPAT_VENV already holds one), then test
#   .ci/compat312.sh install    only the venv with torch and megatron-core, in SFMED_COMPAT_VENV
#   .ci/compat312.sh test       install sfmed into SFMED_COMPAT_VENV's venv if needed, then test
#
# .ci/run uses the two halves: the big downloads (torch with its CUDA libraries, ~6 GB
# installed) run while the main suite does.
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
case "$phase" in all | install | test) ;; *) echo "usage: $0 [install|test]" >&2; exit 2 ;; esac

pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
py312=$(ls -d "$pyenv_root"/versions/3.12*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$py312" ]; then
  echo "compat stage SKIPPED: pyenv has no Python 3.12 under $pyenv_root/versions" \
    "(install one with 'pyenv install 3.12' to run it)"
  exit 0
fi

venv=${SFMED_COMPAT_VENV:-}
if [ -z "$venv" ]; then
  if [ "$phase" != all ]; then
    echo "$0 $phase needs SFMED_COMPAT_VENV=<dir> (shared by the install and test halves)" >&2
    exit 2
  fi
  venv=$(mktemp -d -t sfmed-compat312.XXXXXX)
  trap 'rm -rf "$venv"' EXIT
fi
export PIP_NO_CACHE_DIR=1 # a fresh machine has no pip cache; leave no 6 GB one behind either

stage() { echo; echo "== compat312: $* ($(date +%T))"; }
if [ "$phase" != test ]; then
  t0=$SECONDS
  if [ ! -x "$venv/bin/python" ]; then
    stage "venv from $py312 in $venv"
    "$py312" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    stage "torch from the package index"
    "$venv/bin/python" -m pip install -q torch
    stage "megatron-core 0.19.x"
    "$venv/bin/python" -m pip install -q "megatron-core>=0.19,<0.20"
    echo "compat312: torch and megatron-core installed in $((SECONDS - t0))s"
  fi
  [ "$phase" = install ] && exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "compat312: no environment in $venv (run '$0 install' first)" >&2
  exit 1
fi
# sfmed itself (editable: it writes its metadata into this checkout, so not while another
# install of this checkout may run -- .ci/run's main stage) and its other dependencies.
# (isolated mode: from this checkout's folder, `import sfmed` and the main stage's
# sfmed.egg-info would be found without any install in this venv)
if ! "$venv/bin/python" -I -c "import importlib.metadata as m; m.version('sfmed')" 2>/dev/null; then
  t0=$SECONDS
  stage "sfmed and its dependencies"
  "$venv/bin/python" -m pip install -q -e ".[test]"
  echo "compat312: sfmed installed in $((SECONDS - t0))s ($(du -sh "$venv" | cut -f1))"
fi
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
echo "compat312: tests $((SECONDS - t1))s"
