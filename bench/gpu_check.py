"""The CUDA path of async saves, checked and timed on a machine with a GPU.

Eager and lazy stall against pinned copy_ + synchronize, every file checked bit for bit, and load_into
CUDA targets; then the same saves through the checkpoint service (shared segments registered with
cudaHostRegister like any staging slot). Methodology: bench/README.md, "gpu_check.sh".

Usage: python bench/gpu_check.py [--mib 1024] [--reps 5] [--dir D] [--json F]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import _common as common
import torch
from _common import Op
from torch.utils._pytree import tree_map

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


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_count(mib: int, count: int, reps: int, directory: str, device: str) -> dict:
    params, state, step = make_run(mib, count, device)
    pinned = [torch.empty(p.shape, dtype=p.dtype, pin_memory=device == "cuda") for p in params]
    path = os.path.join(directory, "gpu.pt")
    checks, modes_seen = {"eager": [], "lazy": []}, set()

    def pinned_copy(rep):
        synchronize()
        start = time.perf_counter()
        for dst, src in zip(pinned, params):
            dst.copy_(src.detach(), non_blocking=True)
        synchronize()
        return common.Seconds(time.perf_counter() - start)

    def save(mode: str):
        def run(rep):
            synchronize()
            expected = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state())
            synchronize()
            handle = ckptio.async_save(state(), path, snapshot=mode)
            step()  # mutates everything right after the call
            handle.result()
            if rep != "warmup":  # the warm-up round faults in the staging slots and pins
                checks[mode].append(common.first_difference(torch.load(path, weights_only=True), expected) is None)
                modes_seen.add((mode, handle.snapshot))
            return common.Seconds(handle.stall_seconds)
        return run

    ops = common.measure([Op("pinned copy_ + synchronize", pinned_copy), Op("eager", save("eager")),
                          Op("lazy", save("lazy"))], reps)
    medians = {op.name: op.median for op in ops}
    base = medians["pinned copy_ + synchronize"]
    return {"tensors": count, "mib": mib, "runs": {op.name: op.times for op in ops}, "median_s": medians,
            "eager_vs_pinned": medians["eager"] / base, "lazy_vs_pinned": medians["lazy"] / base,
            "files_exact": {m: all(v) for m, v in checks.items()}, "modes": sorted(modes_seen)}


def through_the_service(args, directory: str) -> list[dict]:
    """bench_count again with CKPTIO_SERVICE=1: the staging slots are shared
    memfd segments (pinned by cudaHostRegister as before) and a service
    process writes the files."""
    from ckptio.background import reset
    from ckptio.service.client import reset_client

    os.environ.update(CKPTIO_SERVICE="1", CKPTIO_SERVICE_DIR=os.path.join(directory, "service"),
                      CKPTIO_SERVICE_IDLE_S="2")
    reset()
    try:
        return [bench_count(args.mib, count, args.reps, directory, args.device) for count in TENSOR_COUNTS]
    finally:
        os.environ.pop("CKPTIO_SERVICE")
        reset()
        reset_client()


def main(argv=None) -> int:
    p = common.parser(__doc__, "gpu_check.json", reps=5, dir_default="the temp directory")
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script where no GPU is")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__}
    with common.temp_workdir(args.dir, "gpu_check-", default=tempfile.gettempdir()) as directory:
        results["counts"] = [bench_count(args.mib, count, args.reps, directory, args.device)
                             for count in TENSOR_COUNTS]
        results["load_into"] = check_load_into(args.mib, directory, args.device)
        results["service_counts"] = through_the_service(args, directory)
    print(f"\nCUDA async_save stall, {args.mib} MiB float32 on {results['device']}, median of {args.reps}")
    print(f"{'tensors':>8} {'pinned copy':>12} {'eager':>9} {'ratio':>6} {'lazy':>9} {'ratio':>6}  files exact")
    for r in results["counts"]:
        m = r["median_s"]
        print(f"{r['tensors']:>8} {m['pinned copy_ + synchronize'] * 1e3:>10.1f}ms {m['eager'] * 1e3:>7.1f}ms "
              f"{r['eager_vs_pinned']:>5.2f}x {m['lazy'] * 1e3:>7.1f}ms {r['lazy_vs_pinned']:>5.2f}x  "
              f"eager {r['files_exact']['eager']}, lazy {r['files_exact']['lazy']} ({r['modes']})")
    for plain, served in zip(results["counts"], results["service_counts"]):
        eager = served["median_s"]["eager"]
        print(f"{plain['tensors']:>8} tensors through the checkpoint service: eager {eager * 1e3:.1f}ms, "
              f"{eager / plain['median_s']['eager']:.2f}x in-process eager; files exact {served['files_exact']}")
    print(f"load_into CUDA targets ({args.mib} MiB): exact {results['load_into']['exact']}, "
          f"addresses kept {results['load_into']['addresses_kept']}, {results['load_into']['seconds']:.3f} s")
    common.write_json(args.json, results, indent=1)
    print(f"JSON: {args.json}")
    ok = all(all(r["files_exact"].values()) for r in results["counts"] + results["service_counts"])
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
