"""The checkpoint service: a restart served by the memory tier, and the stall of saving through the service.

1. Restart: a CheckpointManager(memory=1) saves a --size-gib state through the service; then
   ``load_latest(into=...)`` is timed served by the memory tier (an image on the service's tmpfs)
   and served by local disk with a cold page cache (a manager of the same directory without a
   memory tier), against dd / fio reading the disk file and a warm memcpy of the same bytes.
   Target: memory >= 4x faster than cold disk.
2. Stall: ``async_save``'s stall through the service vs in-process (eager), same run, --stall-mib
   of state in 100 and in 2,400 tensors; each save waits for durable before the next (steady
   state: warm slots, no queueing), 3 saves per block after 2 warm-ups, the modes' blocks
   alternating --reps times. Target: through the service <= 1.1x in-process.

Usage: python bench/service.py [--size-gib 1] [--stall-mib 256] [--reps 5] [--dir D] [--json F]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import _common as common
from _common import Op


def big_state(size_gib: float, pieces: int = 8):
    import torch

    n = int(size_gib * (1 << 30)) // 4 // pieces
    g = torch.Generator().manual_seed(0)
    return {"model": {f"w{i}": torch.randn(n, generator=g) for i in range(pieces)}, "step": 0}


def split_state(total_bytes: int, tensors: int):
    import torch

    n = max(1, total_bytes // 4 // tensors)
    return {"model": {f"p{i}": torch.full((n,), float(i)) for i in range(tensors)}, "step": 0}


def restart(args, root: str, cache: common.PageCache) -> tuple[list[Op], int]:
    import torch

    import ckptio

    run = os.path.join(root, "run")
    state = big_state(args.size_gib)
    with_memory = ckptio.CheckpointManager(run, keep_last=1, memory=1)
    with_memory.save(1, state).result()
    with_memory.wait()
    disk_path = with_memory.path_for(1)
    nbytes = os.path.getsize(disk_path)
    disk_only = ckptio.CheckpointManager(run, keep_last=1)  # same directory, no memory tier: served by disk
    target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}, "step": 0}
    for t in target["model"].values():
        t.fill_(0)  # resident, as a resumed model's tensors are
    source = torch.cat([v.view(-1) for v in state["model"].values()])
    scratch = torch.empty_like(source)

    def load(manager, tier):
        def run_it(rep):
            manager.load_latest(into=target)
            assert manager.last_loaded.tier == tier, manager.last_loaded
        return run_it

    def fio_read(rep):
        out = subprocess.run(["fio", "--name=read", f"--filename={disk_path}", "--readonly", "--rw=read",
                              "--direct=1", "--bs=8M", "--iodepth=8", "--ioengine=libaio", "--output-format=json"],
                             check=True, capture_output=True, text=True).stdout
        read = json.loads(out)["jobs"][0]["read"]
        return common.Seconds(read["io_bytes"] / read["bw_bytes"])

    ops = [Op("load_latest(into) from the memory tier", load(with_memory, "memory")),
           Op("load_latest(into) from local disk, cold cache", load(disk_only, "local"),
              before=lambda: cache.evict(disk_path)),
           Op("dd read of the disk file (direct)", lambda rep: common.dd_read(disk_path))]
    if shutil.which("fio"):
        ops.append(Op("fio read of the disk file (direct, 8 MiB, iodepth 8)", fio_read))
    ops.append(Op("warm memcpy of the same bytes", lambda rep: scratch.copy_(source)))
    for op in ops:
        op.nbytes = nbytes
    common.measure(ops, args.reps)
    assert torch.equal(target["model"]["w0"], state["model"]["w0"])
    return ops, nbytes


def stall(args, root: str) -> dict:
    """Each mode in blocks of saves on its own warm slots (two warm-up saves
    after switching: the arena is rebuilt, private or shared), the blocks
    alternating for --reps rounds so that drift hits both alike."""
    import ckptio
    from ckptio.background import reset

    results = {}
    for tensors in (100, 2400):
        state = split_state(args.stall_mib << 20, tensors)
        times: dict[str, list[float]] = {"in-process": [], "service": []}
        for _ in range(args.reps):
            for mode in times:
                os.environ["CKPTIO_SERVICE"] = "1" if mode == "service" else "0"
                reset()
                for save in range(2 + 3):
                    handle = ckptio.async_save(state, os.path.join(root, f"stall-{mode}.pt"))
                    handle.result()
                    if save >= 2:
                        times[mode].append(handle.stall_seconds)
        med = {m: statistics.median(t) for m, t in times.items()}
        results[tensors] = {"times_s": times, "median_s": med, "ratio": med["service"] / med["in-process"]}
    os.environ.pop("CKPTIO_SERVICE", None)
    reset()
    return results


def main(argv=None) -> int:
    p = common.parser(__doc__, None, reps=5, dir_default="the current directory")
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--stall-mib", type=int, default=256)
    args = p.parse_args(argv)
    service_dir = tempfile.mkdtemp(prefix="ckptio-bench-service-", dir="/dev/shm")
    os.environ["CKPTIO_SERVICE_DIR"] = service_dir
    os.environ["CKPTIO_SERVICE_IDLE_S"] = os.environ["CKPTIO_MEMORY_KEEP_S"] = "5"
    cache = common.PageCache()
    try:
        with common.temp_workdir(args.dir, "ckptio-service-", default=".") as root:
            loads, nbytes = restart(args, root, cache)
            stalls = stall(args, root)
    finally:
        from ckptio.service.client import reset_client

        reset_client()
        time.sleep(0.2)
        shutil.rmtree(service_dir, ignore_errors=True)
    med = {op.name: op.median for op in loads}
    memory, disk = loads[0].median, loads[1].median
    speedup = disk / memory
    gb = nbytes / 1e9
    print(f"restart from the memory tier vs local disk, {gb:.2f} GB, medians of {args.reps}; "
          f"{cache.summary('checkpoint')}")
    common.print_table(("load", "seconds", "GB/s"), [(op.name, f"{op.median:.3f}", f"{op.gbps:.2f}") for op in loads])
    print(f"\nmemory tier vs cold disk: {speedup:.2f}x (target >= 4x: {'met' if speedup >= 4 else 'NOT met'})")
    rows = []
    for tensors, r in stalls.items():
        rows.append((str(tensors), f"{r['median_s']['in-process'] * 1e3:.1f}", f"{r['median_s']['service'] * 1e3:.1f}",
                     f"{r['ratio']:.2f}x", "met" if r["ratio"] <= 1.1 else "NOT met"))
    print(f"\nasync_save stall, {args.stall_mib} MiB, medians of {args.reps * 3} (ms)")
    common.print_table(("tensors", "in-process", "service", "ratio", "target <= 1.1x"), rows)
    if args.json:
        common.write_json(args.json, {
            "bytes": nbytes, "reps": args.reps, "page_cache": cache.describe(),
            "restart_seconds": {op.name: op.times for op in loads}, "restart_medians": med,
            "memory_vs_cold_disk": speedup, "restart_target_met": speedup >= 4,
            "stall": {str(k): v for k, v in stalls.items()},
            "stall_target_met": all(r["ratio"] <= 1.1 for r in stalls.values())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
