"""How long ckptio.async_save blocks the caller as the tensor count grows, against a warm copy_ loop.

Also the stall of the first, second and later saves of a fresh process. Methodology and targets:
bench/README.md, "snapshot_stall.py".

Usage: python bench/snapshot_stall.py [--mib 512] [--reps 5] [--dir D] [--json F]
"""

from __future__ import annotations

import os
import statistics
import time

import _common as common
import torch
from _common import Op

import ckptio

TENSOR_COUNTS = (100, 2400, 10000)
TARGET_STALL_VS_COPY = 1.0  # eager async_save stall / warm copy_ loop, at every tensor count
TARGET_LAZY_STALL_VS_COPY = 0.1  # the same for snapshot="lazy"


def make_state(mib: int, count: int) -> dict:
    per = mib * 2**20 // 4 // count
    return {f"layer{i}.weight": torch.randn(per) for i in range(count)}


def bench_count(mib: int, count: int, reps: int, workdir: str) -> dict:
    from ckptio.pickling import pickle_state

    state = make_state(mib, count)
    # The tensors as parameters of an optimizer that has stepped: what a lazy snapshot copies in the background.
    optimizer = torch.optim.SGD([torch.nn.Parameter(t) for t in state.values()], lr=0.1)
    optimizer.step()  # no gradients: nothing changes, but ckptio has seen it step
    state = {k: p.data for k, p in zip(state, optimizer.param_groups[0]["params"])}
    copy = {k: torch.empty_like(v) for k, v in state.items()}
    path = os.path.join(workdir, "stall.pt")

    def copy_loop(rep):
        for k, v in state.items():
            copy[k].copy_(v)

    def async_save(snapshot=None):
        def run(rep):
            handle = ckptio.async_save(state, path, snapshot=snapshot)
            assert snapshot is None or handle.snapshot == snapshot
            handle.result()
            return common.Seconds(handle.stall_seconds)
        return run

    ops = [Op("copy_ loop", copy_loop), Op("ckptio.async_save", async_save()),
           Op("async_save lazy", async_save("lazy")), Op("pickling pass", lambda rep: pickle_state(state, path))]
    ops[1].run("warmup")  # an extra warm-up: each of the two staging slots is faulted in on its first use
    common.measure(ops, reps)
    medians = {op.name: op.median for op in ops}
    return {"tensors": count, "mib": mib, "runs": {op.name: op.times for op in ops}, "median_s": medians,
            "stall_vs_copy": medians["ckptio.async_save"] / medians["copy_ loop"],
            "lazy_stall_vs_copy": medians["async_save lazy"] / medians["copy_ loop"]}


def worker_cliff(p: dict) -> dict:
    """In a fresh process: the stalls of its first six saves."""
    state = make_state(p["mib"], 100)
    if p["reserve"]:
        ckptio.reserve_staging(state, wait=True)  # e.g. in Lightning's setup hook, sized from the model

    def save(i):
        return ckptio.async_save(state, os.path.join(p["workdir"], f"cliff{i}.pt")).stall_seconds

    # the first save, then a second while the first is still being written (so it takes the other slot)
    stalls = [save(0)]
    time.sleep(0.02)
    stalls.append(save(1))
    ckptio.wait()
    for i in range(2, 6):  # steady state: each save finds a warm, free slot
        stalls.append(save(i))
        ckptio.wait()
    return {"reserve": p["reserve"], "stalls_s": stalls, "first_s": stalls[0], "second_s": stalls[1],
            "steady_s": statistics.median(stalls[2:])}


def main(argv=None) -> int:
    common.serve_worker({"cliff": worker_cliff})
    p = common.parser(__doc__, "snapshot_stall.json", reps=5, dir_default="bench/")
    p.add_argument("--mib", type=int, default=512, help="state size in MiB (default 512)")
    args = p.parse_args(argv)

    with common.temp_workdir(args.dir, "snapshot_stall-", default=common.HERE) as wd:
        results = {"machine": common.machine_info(wd), "counts": [], "cliff": [], "comparisons": []}
        for count in TENSOR_COUNTS:
            r = bench_count(args.mib, count, args.reps, wd)
            results["counts"].append(r)
            results["comparisons"] += [
                common.comparison(f"stall vs copy_ loop, {count} tensors", "ckptio.async_save",
                                  r["stall_vs_copy"], TARGET_STALL_VS_COPY, higher_is_better=False),
                common.comparison(f"lazy stall vs copy_ loop, {count} tensors", "async_save lazy",
                                  r["lazy_stall_vs_copy"], TARGET_LAZY_STALL_VS_COPY, higher_is_better=False)]
        results["cliff"] = [common.run_worker("cliff", {"mib": args.mib, "reserve": reserve}, wd, check=True)
                            for reserve in (False, True)]

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
    print(f"\nstall of the saves of a fresh process ({args.mib} MiB, 100 tensors; "
          "the second overlaps the first's write)")
    print(f"{'':>22} {'first':>8} {'second':>8} {'steady':>8}")
    for r in results["cliff"]:
        label = "reserve_staging first" if r["reserve"] else "default"
        print(f"{label:>22} {r['first_s'] * 1e3:>6.0f}ms {r['second_s'] * 1e3:>6.0f}ms {r['steady_s'] * 1e3:>6.0f}ms")
    common.write_json(args.json, results, indent=1)
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
