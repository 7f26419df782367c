#!/usr/bin/env bash
# tools/gpu_check.py on a borrowed GPU machine that cannot reach a package index, in two steps.
#
#     bash tools/gpu_session.sh fetch [--print]   # here, with network: wheels the GPU image lacks -> .whl/
#     bash tools/gpu_session.sh run [ARGS...]     # there: install .whl/ (if any), run gpu_check.py ARGS
#
# fetch downloads megatron-core at the lock's version (the only runtime dependency the GPU image
# lacks: it has torch, transformers, sentencepiece, tokenizers, safetensors, tensorboard and
# matplotlib) built for that machine's Python (GPU_PYTHON, default 3.12) and x86-64 Linux, into
# .whl/, which it adds to .git/info/exclude so that it travels only when carried. --print shows
# the pip command instead of running it.
# run installs the wheels in GPU_WHEELS (default .whl) into /tmp/site without touching the
# image's packages, then runs gpu_check.py with ARGS (unbuffered) and writes its whole output
# to $OUT/gpu_check.log as well (the current directory without $OUT). Its exit status is
# gpu_check's.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 fetch [--print] | run [gpu_check.py arguments]" >&2; exit 2; }
[ $# -ge 1 ] || usage
step=$1
shift
case "$step" in
  fetch)
    version=$(sed -n 's/^megatron-core==//p' requirements/lock.txt)
    [ -n "$version" ] || { echo "$0: no megatron-core==VERSION line in requirements/lock.txt" >&2; exit 1; }
    command=(python -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}"
             --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
             --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
             "megatron-core==$version")
    if [ "${1:-}" = "--print" ]; then
      echo "${command[*]}"
      exit 0
    fi
    [ $# -eq 0 ] || usage
    mkdir -p .whl .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "${command[@]}"
    echo "carry .whl with the run step: run(command='bash tools/gpu_session.sh run', carry=['.whl'])"
    ;;
  run)
    python=${PYTHON:-python3}
    wheels=${GPU_WHEELS:-.whl}
    if compgen -G "$wheels/*.whl" > /dev/null; then
      "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    log=${OUT:-.}/gpu_check.log
    set +e
    PYTHONUNBUFFERED=1 "$python" tools/gpu_check.py "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    echo "gpu_session: the whole output is in $log"
    exit "$status"
    ;;
  *) usage ;;
esac
