#!/usr/bin/env python3
"""The CUDA path of async saves, checked and timed on a machine with a GPU.

For states of ~100 and ~2,400 CUDA tensors (--mib MiB in all, parameters of
an SGD optimizer with momentum that has stepped, plus a BatchNorm model whose
running stats change in forward):
- baseline: a loop of ``pinned.copy_(t, non_blocking=True)`` into pinned host
  buffers, then ``torch.cuda.synchronize()`` (what a hand-written snapshot
  costs);
- ckptio.async_save eager and lazy: the stall (``handle.stall_seconds``);
- correctness: right after each save, a training step runs (forward changes
  BatchNorm's stats, the optimizer step changes every parameter); the file
  must equal, bit for bit, a clone taken at the call.
Medians of --reps. Prints one table and writes JSON (--json).

Usage: python bench/gpu_check.py [--mib 1024] [--reps 5] [--dir D] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import ckptio

TENSOR_COUNTS = (100, 2400)


def make_run(mib: int, count: int, device: str):
    per = mib * 2**20 // 4 // count
    params = [torch.nn.Parameter(torch.randn(per, device=device)) for _ in range(count)]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    bn = torch.nn.BatchNorm1d(256).to(device)
    x = torch.randn(64, 256, device=device)

    def step():
        bn(x)  # running stats change in forward
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()

    step()  # momentum buffers exist, and ckptio has seen the optimizer step

    def state():
        return {"params": list(params), "optimizer": optimizer.state_dict(), "bn": bn.state_dict()}

    return params, state, step


def clone(obj):
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, obj)


def same(a, b) -> bool:
    flat_a, spec_a = torch.utils._pytree.tree_flatten(a)
    flat_b, spec_b = torch.utils._pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(flat_a, flat_b):
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.cpu().reshape(-1).view(torch.uint8),
                                                                        y.cpu().reshape(-1).view(torch.uint8)):
                return False
        elif x != y:
            return False
    return True


def synchronize() -> None:
    if torch.cuda.is_available():
        synchronize()


def bench_count(mib: int, count: int, reps: int, directory: str, device: str) -> dict:
    params, state, step = make_run(mib, count, device)
    pinned = [torch.empty(p.shape, dtype=p.dtype, pin_memory=device == "cuda") for p in params]
    path = os.path.join(directory, "gpu.pt")

    def pinned_copy() -> float:
        synchronize()
        start = time.perf_counter()
        for dst, src in zip(pinned, params):
            dst.copy_(src.detach(), non_blocking=True)
        synchronize()
        return time.perf_counter() - start

    def save(mode: str):
        synchronize()
        expected = clone(state())
        synchronize()
        handle = ckptio.async_save(state(), path, snapshot=mode)
        step()  # mutates everything right after the call
        handle.result()
        ok = same(torch.load(path, weights_only=True), expected)
        return handle.stall_seconds, handle.snapshot, ok

    runs = {"pinned copy_ + synchronize": [], "eager": [], "lazy": []}
    checks = {"eager": [], "lazy": []}
    modes_seen = set()
    for i in range(reps + 1):  # the first round warms up (staging slots, pinning)
        t = pinned_copy()
        stalls = {m: save(m) for m in ("eager", "lazy")}
        if i == 0:
            continue
        runs["pinned copy_ + synchronize"].append(t)
        for m, (stall, snapshot, ok) in stalls.items():
            runs[m].append(stall)
            checks[m].append(ok)
            modes_seen.add((m, snapshot))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    base = medians["pinned copy_ + synchronize"]
    return {"tensors": count, "mib": mib, "runs": runs, "median_s": medians,
            "eager_vs_pinned": medians["eager"] / base, "lazy_vs_pinned": medians["lazy"] / base,
            "files_exact": {m: all(v) for m, v in checks.items()}, "modes": sorted(modes_seen)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=None)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script where no GPU is")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "gpu_check.json"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    directory = args.dir or tempfile.mkdtemp(prefix="gpu_check-")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "counts": []}
    for count in TENSOR_COUNTS:
        results["counts"].append(bench_count(args.mib, count, args.reps, directory, args.device))
    print(f"\nCUDA async_save stall, {args.mib} MiB float32 on {results['device']}, median of {args.reps}")
    print(f"{'tensors':>8} {'pinned copy':>12} {'eager':>9} {'ratio':>6} {'lazy':>9} {'ratio':>6}  files exact")
    for r in results["counts"]:
        m = r["median_s"]
        print(f"{r['tensors']:>8} {m['pinned copy_ + synchronize'] * 1e3:>10.1f}ms {m['eager'] * 1e3:>7.1f}ms "
              f"{r['eager_vs_pinned']:>5.2f}x {m['lazy'] * 1e3:>7.1f}ms {r['lazy_vs_pinned']:>5.2f}x  "
              f"eager {r['files_exact']['eager']}, lazy {r['files_exact']['lazy']} ({r['modes']})")
    results["load_into"] = check_load_into(args.mib, directory, args.device)
    print(f"load_into CUDA targets ({args.mib} MiB): exact {results['load_into']['exact']}, "
          f"addresses kept {results['load_into']['addresses_kept']}, {results['load_into']['seconds']:.3f} s")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"JSON: {args.json}")
    ok = all(all(r["files_exact"].values()) for r in results["counts"])
    ok = ok and results["load_into"]["exact"] and results["load_into"]["addresses_kept"]
    return 0 if ok else 1


def check_load_into(mib: int, directory: str, device: str) -> dict:
    """ckptio.load_into with targets on the device: read on the host, copied in
    on a side stream; the values must be exact and the targets keep their memory."""
    state = {f"w{i}": torch.randn(mib * (1 << 20) // 4 // 16, device=device) for i in range(16)}
    path = os.path.join(directory, "load_into.pt")
    ckptio.save(state, path)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    addresses = {k: v.data_ptr() for k, v in target.items()}
    synchronize()
    t0 = time.perf_counter()
    out = ckptio.load_into(target, path)
    synchronize()
    seconds = time.perf_counter() - t0
    return {"exact": all(torch.equal(out[k], state[k]) for k in state),
            "addresses_kept": all(out[k].data_ptr() == addresses[k] and out[k] is target[k] for k in state),
            "seconds": seconds}


if __name__ == "__main__":
    sys.exit(main())
