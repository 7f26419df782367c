#!/usr/bin/env bash
# Regenerate requirements/lock.txt in a throwaway venv and pin every package it ends up with (pip
# and setuptools included). Moving the lock is a deliberate commit: run `make test` with the new
# lock before committing it.
#
#     bash tools/lock_environment.sh            # resolve setup.py's ranges afresh (pins may move)
#     bash tools/lock_environment.sh --add      # keep every existing pin; pin only what is new
#
# --add is for a dependency added to setup.py: the current lock is applied as pip constraints,
# so only packages the lock does not name are resolved, and the script refuses to write a lock
# in which any existing pin moved or disappeared.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt
mode=full
case "${1:-}" in
  "") ;;
  --add) mode=add ;;
  *) echo "lock_environment.sh: unknown argument ${1} (use --add, or nothing)" >&2; exit 2 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
pip="$work/venv/bin/pip"
if [ "$mode" = add ]; then
  cp "$LOCK" "$work/old.txt"
  # The same steps as the Makefile: locked pip/setuptools, CPU torch first, no build isolation.
  "$pip" install --quiet --constraint "$LOCK" pip setuptools wheel
  "$pip" install --quiet --constraint "$LOCK" torch
  "$pip" install --quiet --constraint "$LOCK" --no-build-isolation -e ".[dev,hf]"
else
  "$pip" install --quiet --upgrade pip setuptools wheel
  # The CPU build first: an unpinned resolve of torch pulls a multi-GB CUDA build.
  "$pip" install --quiet "torch==2.13.0"
  "$pip" install --quiet -e ".[dev,hf]"
fi
{
  echo "# Every package of the environment that 'make test' and 'make quickstart' build, pinned."
  echo "# Applied as pip constraints by the Makefile. Regenerate: bash tools/lock_environment.sh"
  echo "# (then run 'make clean test' and commit the new lock with the suite's result)."
  if [ "$mode" = add ]; then
    echo "# $(grep '^# Python' "$LOCK" | sed 's/^# //; s/;.*$//; s/\.$//'); extended $(date -u +%Y-%m-%d) by --add (no pin moved)."
  else
    echo "# Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())'), generated $(date -u +%Y-%m-%d)."
  fi
  # --all keeps pip/setuptools/wheel; the project itself (editable) is not pinned; a local
  # version label (+cpu) is dropped so the pin matches the CPU wheel and the same release.
  "$pip" freeze --all --exclude-editable | grep -v -i '^megatron[-_]mosaic' | sed 's/+[A-Za-z0-9.]*$//' | LC_ALL=C sort -f
} > "$LOCK.tmp"
if [ "$mode" = add ]; then
  # Every old pin must still be there, byte for byte: an --add that moved one is a bug.
  missing=$(grep -v '^#' "$work/old.txt" | grep -vxF -f <(grep -v '^#' "$LOCK.tmp") || true)
  if [ -n "$missing" ]; then
    rm -f "$LOCK.tmp"
    echo "lock_environment.sh --add: these pins would move or vanish, lock left as it was:" >&2
    echo "$missing" >&2
    exit 1
  fi
fi
mv "$LOCK.tmp" "$LOCK"
echo "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
