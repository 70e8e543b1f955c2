#!/usr/bin/env bash
# The CUDA path of async saves on a machine with a GPU, in one run: build and
# install ckptio into the Python that has CUDA torch (no network needed when
# scikit-build-core, pybind11, cmake and ninja are there), run the tests that
# use CUDA when present, then bench/gpu_check.py (eager and lazy stall vs a
# pinned copy_ + synchronize, files checked bit for bit).
#
# Usage: bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter,
#                                            OUT=dir for the JSON and the log)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, torch.cuda.get_device_name())'
"$PYTHON" -m pip install -q --no-build-isolation --no-deps --force-reinstall . 2>&1 | tail -3
cd tests
"$PYTHON" -m pytest -q -x -p no:cacheprovider test_lazy_snapshot.py test_async.py -k "not trainer" 2>&1 | tail -5 || true
cd ..
"$PYTHON" bench/gpu_check.py --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt"
