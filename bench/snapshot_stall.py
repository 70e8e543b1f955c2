#!/usr/bin/env python3
"""How long ckptio.async_save blocks the caller, against one warm copy_ loop,
as the number of tensors grows; and the stall of the first, second and later
saves of a run.

1. Tensor count: states of --mib MiB (float32) split into ~100, ~2,400 and
   ~10,000 tensors. Baseline: a Python loop of ``dst.copy_(src)`` over the
   same tensors into a preallocated, already-touched copy (the least a
   snapshot made from Python costs). Measured: ckptio.async_save's stall
   (``handle.stall_seconds``; each save is waited for before the next, so no
   stall includes queue back-pressure), the same with snapshot="lazy" (the
   tensors are the parameters of an optimizer that has stepped, so their
   copy is left to the background; the save is awaited, so the copy never
   overlaps the next measurement) and, for the breakdown, the pickling pass
   alone. Medians of --reps after one untimed warm-up each.
2. First-save cliff: in a fresh process, the first save of a --mib MiB state,
   a second one 20 ms later (while the first is being written, so it takes the
   other staging slot), then four more each after the previous landed
   (steady state, no back-pressure); without and with
   ckptio.reserve_staging(state, wait=True) up front.

Usage: python bench/snapshot_stall.py [--mib 512] [--reps 5] [--dir D] [--json F]
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

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import ckptio  # noqa: E402
from save_load import comparison, machine_info  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(HERE), "bench", "results", "snapshot_stall.json")
TENSOR_COUNTS = (100, 2400, 10000)
TARGET_STALL_VS_COPY = 1.0  # eager async_save stall / warm copy_ loop, at every tensor count
TARGET_LAZY_STALL_VS_COPY = 0.1  # the same for snapshot="lazy"


def make_state(mib: int, count: int) -> dict:
    per = mib * 2**20 // 4 // count
    return {f"layer{i}.weight": torch.randn(per) for i in range(count)}


def bench_count(mib: int, count: int, reps: int, directory: str) -> dict:
    from ckptio.pickling import pickle_state

    state = make_state(mib, count)
    # The tensors as parameters of an optimizer that has stepped: what a lazy snapshot copies in the background.
    optimizer = torch.optim.SGD([torch.nn.Parameter(t) for t in state.values()], lr=0.1)
    optimizer.step()  # no gradients: nothing changes, but ckptio has seen it step
    state = {k: p.data for k, p in zip(state, optimizer.param_groups[0]["params"])}
    copy = {k: torch.empty_like(v) for k, v in state.items()}
    path = os.path.join(directory, "stall.pt")

    def copy_loop() -> float:
        start = time.perf_counter()
        for k, v in state.items():
            copy[k].copy_(v)
        return time.perf_counter() - start

    def async_save() -> float:
        handle = ckptio.async_save(state, path)
        handle.result()
        return handle.stall_seconds

    def lazy_async_save() -> float:
        handle = ckptio.async_save(state, path, snapshot="lazy")
        assert handle.snapshot == "lazy"
        handle.result()
        return handle.stall_seconds

    def pickling() -> float:
        start = time.perf_counter()
        pickle_state(state, path)
        return time.perf_counter() - start

    runs = {"copy_ loop": [], "ckptio.async_save": [], "async_save lazy": [], "pickling pass": []}
    for fn in (copy_loop, async_save, async_save, lazy_async_save, pickling):  # warm-ups: both slots, the copy
        fn()
    for _ in range(reps):
        runs["copy_ loop"].append(copy_loop())
        runs["ckptio.async_save"].append(async_save())
        runs["async_save lazy"].append(lazy_async_save())
        runs["pickling pass"].append(pickling())
    medians = {k: statistics.median(v) for k, v in runs.items()}
    return {"tensors": count, "mib": mib, "runs": runs, "median_s": medians,
            "stall_vs_copy": medians["ckptio.async_save"] / medians["copy_ loop"],
            "lazy_stall_vs_copy": medians["async_save lazy"] / medians["copy_ loop"]}


CLIFF_SCRIPT = """
import json, os, sys, time, torch, ckptio
sys.path.insert(0, {here!r})
from snapshot_stall import make_state
state = make_state({mib}, 100)
if {reserve}:
    ckptio.reserve_staging(state, wait=True)  # e.g. in Lightning's setup hook, sized from the model
path = lambda i: os.path.join({directory!r}, f"cliff{{i}}.pt")
# the first save, then a second while the first is still being written (so it takes the other slot)
stalls = [ckptio.async_save(state, path(0)).stall_seconds]
time.sleep(0.02)
stalls.append(ckptio.async_save(state, path(1)).stall_seconds)
ckptio.wait()
for i in range(2, 6):  # steady state: each save finds a warm, free slot
    stalls.append(ckptio.async_save(state, path(i)).stall_seconds)
    ckptio.wait()
print(json.dumps(stalls))
"""


def bench_cliff(mib: int, directory: str, reserve: bool) -> dict:
    code = CLIFF_SCRIPT.format(here=HERE, mib=mib, reserve=reserve, directory=directory)
    # run from the data directory: a source checkout in the working directory would shadow the install
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=directory)
    stalls = json.loads(out.stdout.strip().splitlines()[-1])
    return {"reserve": reserve, "stalls_s": stalls, "first_s": stalls[0], "second_s": stalls[1],
            "steady_s": statistics.median(stalls[2:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512, help="state size in MiB (default 512)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--dir", default=None, help="directory for the files (default: a temporary one under bench/)")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)

    directory = args.dir or tempfile.mkdtemp(prefix="snapshot_stall-", dir=HERE)
    os.makedirs(directory, exist_ok=True)
    results = {"machine": machine_info(directory), "counts": [], "cliff": [], "comparisons": []}
    for count in TENSOR_COUNTS:
        r = bench_count(args.mib, count, args.reps, directory)
        results["counts"].append(r)
        results["comparisons"].append(comparison(f"stall vs copy_ loop, {count} tensors", "ckptio.async_save",
                                                 r["stall_vs_copy"], TARGET_STALL_VS_COPY, higher_is_better=False))
        results["comparisons"].append(comparison(f"lazy stall vs copy_ loop, {count} tensors", "async_save lazy",
                                                 r["lazy_stall_vs_copy"], TARGET_LAZY_STALL_VS_COPY,
                                                 higher_is_better=False))
    for reserve in (False, True):
        results["cliff"].append(bench_cliff(args.mib, directory, reserve))
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))
    if not args.dir:
        os.rmdir(directory)

    print(f"\nasync_save stall, {args.mib} MiB float32, median of {args.reps}")
    print(f"{'tensors':>8} {'copy_ loop':>11} {'(pickling)':>11} {'eager':>9} {'ratio':>6} {'lazy':>9} {'ratio':>6}"
          f"  targets: eager <= {TARGET_STALL_VS_COPY:.1f}x, lazy <= {TARGET_LAZY_STALL_VS_COPY:.1f}x")
    comparisons = iter(results["comparisons"])
    for r in results["counts"]:
        m, eager, lazy = r["median_s"], next(comparisons), next(comparisons)
        print(f"{r['tensors']:>8} {m['copy_ loop'] * 1e3:>9.1f}ms {m['pickling pass'] * 1e3:>9.1f}ms "
              f"{m['ckptio.async_save'] * 1e3:>7.1f}ms {r['stall_vs_copy']:>5.2f}x "
              f"{m['async_save lazy'] * 1e3:>7.1f}ms {r['lazy_stall_vs_copy']:>5.2f}x  "
              f"eager {'met' if eager['met'] else 'MISSED'}, lazy {'met' if lazy['met'] else 'MISSED'}")
    print(f"\nstall of the saves of a fresh process ({args.mib} MiB, 100 tensors; the second overlaps the first's write)")
    print(f"{'':>22} {'first':>8} {'second':>8} {'steady':>8}")
    for r in results["cliff"]:
        label = "reserve_staging first" if r["reserve"] else "default"
        print(f"{label:>22} {r['first_s'] * 1e3:>6.0f}ms {r['second_s'] * 1e3:>6.0f}ms {r['steady_s'] * 1e3:>6.0f}ms")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
