#!/usr/bin/env bash
# Run the Hugging Face tests (tests/hf) against one transformers release, in a throwaway venv.
#
#     bash tools/test_transformers.sh latest        # the newest transformers on PyPI
#     bash tools/test_transformers.sh 5.0.0         # one release
#     bash tools/test_transformers.sh 5.0.0 DIR     # build the venv in DIR and keep it
#
# The project is installed with setup.py's ranges (torch first, at the lock's CPU version: an
# unconstrained resolve pulls a multi-GB CUDA build), then the requested transformers is forced
# on top, whatever setup.py's range says: the point is to see whether a release outside the
# range still works before moving the range. Exits with pytest's status (non-zero on any failure,
# and when no test was collected); the temporary venv is removed on exit.
set -euo pipefail

usage() { echo "usage: $0 VERSION|latest [VENV_DIR]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
version=$1
case "$version" in
  latest) spec=transformers ;;
  [0-9]*) spec="transformers==$version" ;;
  *) echo "$0: error: VERSION must be a release number such as 5.0.0, or 'latest' (got '$version')" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [ $# -eq 2 ]; then
  work=$(mkdir -p "$2" && cd "$2" && pwd)
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/test-transformers.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi

torch_pin=$(grep -i '^torch==' "$repo/requirements/lock.txt" || true)
[ -n "$torch_pin" ] || { echo "$0: error: requirements/lock.txt pins no torch" >&2; exit 2; }

"$PYTHON" -m venv "$work/venv"
pip=("$work/venv/bin/pip" install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip setuptools wheel
"${pip[@]}" "$torch_pin"
"${pip[@]}" --no-build-isolation -e "$repo[dev,hf]"
# Forced after the project: a release outside setup.py's range is installed all the same (pip
# reports the conflict), so this also answers whether the range may be widened.
"${pip[@]}" --upgrade "$spec"
"$work/venv/bin/python" -c 'import torch, transformers; print(f"transformers {transformers.__version__}, torch {torch.__version__}")'

cd "$repo"
# Remote code (exported model directories) is cached per transformers install: keep it in the venv.
status=0
HF_MODULES_CACHE="$work/hf_modules" "$work/venv/bin/python" -m pytest tests/hf -q -p no:cacheprovider || status=$?
if [ "$status" -eq 5 ]; then
  echo "$0: error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
