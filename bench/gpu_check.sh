#!/usr/bin/env bash
# The CUDA path of async saves on a machine with a GPU, in one run: see bench/README.md, "gpu_check.sh".
# Usage: bash bench/gpu_check.sh   (PYTHON=... picks the interpreter, OUT=dir the JSON and logs)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("torch", torch.__version__, torch.cuda.get_device_name())'
"$PYTHON" -m pip install -q --no-build-isolation --no-deps --force-reinstall . 2>&1 | tail -3
# A test failure is reported at the end, after the bench has run too.
tests_rc=0
(cd tests && "$PYTHON" -m pytest -q -p no:cacheprovider test_lazy_snapshot.py test_async.py -k "not trainer") \
    > "$OUT/gpu_tests.txt" 2>&1 || tests_rc=$?
tail -5 "$OUT/gpu_tests.txt"
bench_rc=0
"$PYTHON" bench/gpu_check.py --json "$OUT/gpu_check.json" > "$OUT/gpu_check.txt" 2>&1 || bench_rc=$?
cat "$OUT/gpu_check.txt"
fsdp_rc=0  # ckptio.lightning.FSDPStrategy's sharded checkpoints (FSDP1 refuses the CPU: only here)
"$PYTHON" bench/gpu_fsdp_sharded.py "$(mktemp -d)" > "$OUT/gpu_fsdp_sharded.txt" 2>&1 || fsdp_rc=$?
tail -3 "$OUT/gpu_fsdp_sharded.txt"
echo "tests rc=$tests_rc, gpu_check rc=$bench_rc (1: a file differed from the state at its save), fsdp rc=$fsdp_rc"
exit $(( tests_rc || bench_rc || fsdp_rc ))
