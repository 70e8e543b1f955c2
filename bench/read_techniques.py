#!/usr/bin/env python3
"""Fresh-memory ckptio.load under each read technique the engine has, cold cache.

Issue 13 asked to measure each way of keeping page faults off a load's path
and keep what wins. The engine can read a payload

- into an 8 MiB bounce block with O_DIRECT, CRC it there while it is in
  cache, and copy it out (the default), or
- with O_DIRECT straight into the page-aligned destination
  (CKPTIO_READ_ZERO_COPY=1);

and can run a prefaulter (MADV_POPULATE_WRITE) ahead of the readers, on by
default. Large destinations are already 2 MiB aligned with MADV_HUGEPAGE
(transparent huge pages where the kernel allows). This script loads the same
checkpoint with an engine of each combination, dropping the page cache
before every load, round-robin with dd iflag=direct as the baseline; medians.

Usage: python bench/read_techniques.py [--size-gib 1] [--reps 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import ckptio
from ckptio import _C, _engine
from ckptio.config import engine_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from save_load import DD_BLOCK, PageCache, make_state_dict  # noqa: E402

VARIANTS = {  # name -> (zero_copy_reads, read_prefault)
    "bounce + copy, prefault (default)": (False, True),
    "bounce + copy, no prefault": (False, False),
    "zero-copy O_DIRECT, prefault": (True, True),
    "zero-copy O_DIRECT, no prefault": (True, False),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "read_techniques.json"))
    args = p.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix=".ckptio-bench-read-", dir=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    path = os.path.join(workdir, "state.ckpt")
    ckptio.save(make_state_dict(args.size_gib), path)
    size = os.path.getsize(path)
    cache = PageCache()
    cfg = engine_config()
    engines = {name: _C.Engine(cfg.num_threads, cfg.block_bytes, cfg.queue_depth, cfg.direct, zero_copy, prefault)
               for name, (zero_copy, prefault) in VARIANTS.items()}
    times: dict = {name: [] for name in [*VARIANTS, "dd read (direct)"]}
    try:
        for rep in range(args.reps + 1):  # the first round is a warm-up
            for name in times:
                cache.evict(path)
                t0 = time.perf_counter()
                if name in engines:
                    _engine._engine = engines[name]  # what ckptio.load uses
                    state = ckptio.load(path)
                    del state
                else:
                    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}", "iflag=direct",
                                    "status=none"], check=True)
                if rep:
                    times[name].append(time.perf_counter() - t0)
    finally:
        _engine.reset_engine()
        os.remove(path)
        os.rmdir(workdir)
    dd = statistics.median(times["dd read (direct)"])
    results = {"bytes": size, "cache": cache.describe(), "variants": {
        name: {"times_s": t, "median_s": statistics.median(t), "gb_per_s": size / 1e9 / statistics.median(t),
               "vs_dd": dd / statistics.median(t)} for name, t in times.items()}}
    print(f"\nckptio.load into fresh memory, {size / 2**30:.2f} GiB, cold cache, median of {args.reps}")
    print(f"{'technique':36} {'median s':>9} {'GB/s':>6} {'vs dd':>6}")
    for name, r in results["variants"].items():
        print(f"{name:36} {r['median_s']:>9.3f} {r['gb_per_s']:>6.2f} {r['vs_dd']:>5.2f}x")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
