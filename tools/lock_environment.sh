#!/usr/bin/env bash
# Regenerate requirements/lock.txt: resolve setup.py's ranges afresh in a throwaway venv and pin
# every package it ends up with (pip and setuptools included). Moving the lock is a deliberate
# commit: run `make test` with the new lock before committing it.
#
#     bash tools/lock_environment.sh            # writes requirements/lock.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install --quiet --upgrade pip setuptools wheel
# The CPU build first: an unpinned resolve of torch pulls a multi-GB CUDA build.
"$pip" install --quiet "torch==2.13.0"
"$pip" install --quiet -e ".[dev,hf]"
{
  echo "# Every package of the environment that 'make test' and 'make quickstart' build, pinned."
  echo "# Applied as pip constraints by the Makefile. Regenerate: bash tools/lock_environment.sh"
  echo "# (then run 'make clean test' and commit the new lock with the suite's result)."
  echo "# Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())'), generated $(date -u +%Y-%m-%d)."
  # --all keeps pip/setuptools/wheel; the project itself (editable) is not pinned; a local
  # version label (+cpu) is dropped so the pin matches the CPU wheel and the same release.
  "$pip" freeze --all --exclude-editable | grep -v -i '^megatron[-_]mosaic' | sed 's/+[A-Za-z0-9.]*$//' | LC_ALL=C sort -f
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
