#!/usr/bin/env python3
"""Benchmark ckptio's torch.distributed.checkpoint storage against DCP's stock one.

Two ranks (gloo, CPU, spawned with torch.multiprocessing) hold a ``--size-gib``
GiB state between them (default 2, i.e. 1 GiB a rank). Measured in one run:

1. Save: ``dcp.save`` with ``ckptio.distributed.StorageWriter`` against the
   stock ``FileSystemWriter(path, sync_files=True)`` (both durable: every rank
   file is fsynced). Every save goes to a fresh directory.
2. Load with a cold page cache (dropped before every load through
   /proc/sys/vm/drop_caches; if that is not allowed, each checkpoint file is
   evicted with posix_fadvise and the JSON says ``"cold_cache": false`` with
   the reason): ``dcp.load`` into preallocated, already-touched target
   DTensors of the same sharding, as DCP does (every item is read and copied
   into its target). ckptio's StorageReader (CRC-32 verified) reads a
   checkpoint written by StorageWriter, reading each item straight into its
   target DTensor's local tensor; the stock FileSystemReader reads one
   written by FileSystemWriter (a BytesIO + torch.load + copy_ per item).
   Target: ckptio >= 1.5x faster. For context: StorageReader(verify=False),
   and the stock reader on the ckptio checkpoint. The time each rank spends
   inside ``read_data`` (the StorageReader's own part; the rest of dcp.load
   is DCP's planning and collectives, the same for both readers) is
   reported as its own phase, with the same target.
3. ``dcp.async_save`` stall, i.e. the time until the call returns, each call in
   its own gloo process group (``dist.new_group(backend="gloo")``), each future
   waited for before the next save:
   - stock FileSystemWriter with its default staging (a fresh CPU copy of the
     state at every save);
   - ckptio's StorageWriter, one writer reused for every save with
     ``checkpoint_id=`` naming the fresh directory, so its pre-faulted staging
     buffer is reused (DCP's recommended pattern);
   - for context: a new StorageWriter per save (the buffer is allocated and
     faulted in every time), and the stock writer with
     ``cache_staged_state_dict=True`` (it pins its cache, which needs an
     accelerator: on a CPU-only torch it raises, and the JSON says so).
   The time from the call until the future's result() (durable) is recorded
   too. After the timed saves, one extra async_save with the reused ckptio
   writer checks the snapshot: a tensor is changed right after the call
   returns, and the checkpoint must still hold the old values.

The state: every tensor is a DTensor sharded with Shard(0) over the 2-rank CPU
mesh, which is how FSDP2 holds parameters and optimizer state, so DCP plans
real shards (chunk offsets in the global metadata, one file a rank). The local
shards are generated directly on each rank and wrapped with
``DTensor.from_local`` (no rank ever materialises a full tensor). Global tensors
follow save_load.py's mix: ~50% of the bytes in 4 large tensors per GiB, ~40%
in ~100 medium ones, ~10% in ~2000 small ones (4-100 KiB), fp32/bf16/int64,
2-D with an even number of rows; plus a plain int ("step"), written as bytes.

Timing: every operation starts after a barrier on all ranks; the reported time
is rank 0's, from that barrier to a second barrier after the operation (so it
is the slowest rank's time). Each rank's own time for the operation is kept in
the JSON, and its maximum is shown too. Each measurement gets one untimed
warm-up, then ``--reps`` timed rounds, round-robin within each phase; medians
are reported. GB/s is 1e9 bytes of tensor state (all ranks) per second. Each
rank uses nproc/2 torch threads. The load average at the start and end is
recorded: on a shared machine, other work shows in these timings. The only
target is the verified load's (above); the other rows show ratios only.

Usage: python bench/dcp.py [--size-gib 2] [--reps 3] [--dir D] [--json F]
       python bench/dcp.py --quick           # 0.25 GiB, 3 reps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np
import torch

from save_load import (  # machine description, page cache probe, report helpers
    DTYPES,
    GIB,
    PageCache,
    _fmt_met,
    _fmt_target,
    _fmt_value,
    comparison,
    filesystem_type,
    machine_info,
    resident_bytes,
)

REPO_ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(REPO_ROOT, "bench", "results", "dcp.json")
WORLD = 2
QUICK_SIZE_GIB = 0.25

# Names of the measurements (also the JSON keys).
SAVE_STOCK = "stock FileSystemWriter(sync_files=True)"
SAVE_CKPTIO = "ckptio StorageWriter"
# Issue 13: the verified ckptio reader (items read straight into the targets)
# against the stock reader, on the same sharding.
TARGET_LOAD_SPEEDUP = 1.5
LOAD_STOCK = "stock FileSystemReader (stock checkpoint)"
LOAD_CKPTIO = "ckptio StorageReader (ckptio checkpoint, verify)"
LOAD_CKPTIO_NOVERIFY = "ckptio StorageReader(verify=False) (ckptio checkpoint)"
LOAD_STOCK_ON_CKPTIO = "stock FileSystemReader (ckptio checkpoint)"
ASYNC_STOCK = "stock FileSystemWriter (default staging)"
ASYNC_CKPTIO = "ckptio StorageWriter (reused, checkpoint_id=)"
ASYNC_CKPTIO_NEW = "ckptio StorageWriter (new writer per save)"
ASYNC_STOCK_CACHED = "stock FileSystemWriter(cache_staged_state_dict=True, reused)"

READ_DATA = "load, read_data only"  # the StorageReader's own part of dcp.load
BASELINES = {"save": SAVE_STOCK, "load": LOAD_STOCK, READ_DATA: LOAD_STOCK, "async_save stall": ASYNC_STOCK,
             "async_save until durable": ASYNC_STOCK}


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# --------------------------------------------------------------------------
# State: DTensors sharded with Shard(0) over the 2-rank mesh
# --------------------------------------------------------------------------

COLS = {"large": 4096, "medium": 1024, "small": 64}


def global_layout(size_gib: float, seed: int = 0) -> list[tuple[str, tuple[int, int], torch.dtype]]:
    """(name, global shape, dtype) of every tensor: save_load.py's mix, 2-D, even rows."""
    total = size_gib * GIB
    rng = np.random.default_rng(seed)
    n_large = max(1, round(4 * size_gib))
    n_medium = max(1, round(100 * size_gib))
    n_small = max(1, round(2000 * size_gib))
    sizes: list[tuple[str, int]] = []
    sizes += [("large", int(0.5 * total / n_large))] * n_large
    medium_mean = 0.4 * total / n_medium
    sizes += [("medium", int(medium_mean * rng.uniform(0.5, 1.5))) for _ in range(n_medium)]
    small_mean = 0.1 * total / n_small
    sizes += [("small", int(rng.uniform(4 * 1024, 2 * small_mean - 4 * 1024))) for _ in range(n_small)]
    order = rng.permutation(len(sizes))
    layout = []
    for i, j in enumerate(order):
        kind, nbytes = sizes[j]
        dtype = DTYPES[i % len(DTYPES)]
        cols = COLS[kind]
        rows = max(WORLD, WORLD * round(nbytes / dtype.itemsize / cols / WORLD))
        layout.append((f"layers.{i}.{kind}", (rows, cols), dtype))
    return layout


def make_sharded_state(layout, mesh, rank: int, fill: str, seed: int = 0) -> dict:
    """Local shards (rows/WORLD x cols) wrapped as DTensors; fill='random' or 'zeros'."""
    from torch.distributed.tensor import DTensor, Shard

    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    sd = {}
    for name, (rows, cols), dtype in layout:
        shape = (rows // WORLD, cols)
        if fill == "zeros":
            local = torch.zeros(shape, dtype=dtype)  # touched: every page is faulted in
        elif dtype.is_floating_point:
            local = torch.randn(shape, dtype=dtype, generator=gen)
        else:
            local = torch.randint(0, 1 << 31, shape, dtype=dtype, generator=gen)
        sd[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size((rows, cols)), stride=(cols, 1))
    sd["step"] = 1000 if fill == "random" else 0
    return sd


def describe_layout(layout) -> dict:
    by_kind: dict[str, dict] = {}
    by_dtype: dict[str, int] = {}
    total = 0
    for name, (rows, cols), dtype in layout:
        nbytes = rows * cols * dtype.itemsize
        entry = by_kind.setdefault(name.rsplit(".", 1)[1], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
        by_dtype[str(dtype)] = by_dtype.get(str(dtype), 0) + nbytes
        total += nbytes
    return {"tensors": len(layout), "bytes": total, "bytes_per_rank": total // WORLD,
            "sharding": f"Shard(0) over a {WORLD}-rank CPU mesh (DTensor.from_local)",
            "by_kind": by_kind, "bytes_by_dtype": by_dtype, "non_tensor_items": ["step (int)"]}


def local_tensors(sd: dict) -> dict:
    from torch.distributed.tensor import DTensor

    return {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in sd.items()}


def same_state(a: dict, b: dict) -> str | None:
    """None if every local shard and value agree, else the first difference."""
    la, lb = local_tensors(a), local_tensors(b)
    if la.keys() != lb.keys():
        return "keys differ"
    for k, x in la.items():
        y = lb[k]
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or not torch.equal(x, y):
                return f"tensor {k} differs"
        elif x != y:
            return f"value {k} differs: {x!r} != {y!r}"
    return None


# --------------------------------------------------------------------------
# Collective timing
# --------------------------------------------------------------------------

class Op:
    """One measured operation, run on every rank.

    run(tag) -> result (on every rank, timed); before() runs on rank 0 before
    the opening barrier; after(result, t0) -> dict of per-rank extras runs on
    every rank after the closing barrier; cleanup(result) runs on every rank
    after a third barrier (rank 0 deletes what was written).
    """

    def __init__(self, name, phase, run, before=None, after=None, cleanup=None, may_fail=False):
        self.name, self.phase, self.run, self.may_fail = name, phase, run, may_fail
        self.before, self.after, self.cleanup = before, after, cleanup
        self.times: list[float] = []        # rank 0, barrier to barrier
        self.rank_times: list[list] = []    # per rep: every rank's own time for run()
        self.rank_extras: list[list] = []   # per rep: every rank's after() dict
        self.warmup: dict | None = None
        self.unavailable: str | None = None

    def once(self, tag, rank: int) -> tuple[float, list, list]:
        import torch.distributed as dist

        if rank == 0 and self.before is not None:
            self.before()
        dist.barrier()
        t0 = time.perf_counter()
        result = self.run(tag)
        own = time.perf_counter() - t0
        dist.barrier()
        wall = time.perf_counter() - t0
        extra = self.after(result, t0) if self.after is not None else {}
        dist.barrier()
        if self.cleanup is not None:
            self.cleanup(result)
        del result
        gc.collect()
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, {"own_s": own, **extra})
        return wall, [g["own_s"] for g in gathered], [{k: v for k, v in g.items() if k != "own_s"}
                                                       for g in gathered]

    def to_json(self, state_bytes: int) -> dict:
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        med = statistics.median(self.times)
        max_rank = [max(r) for r in self.rank_times]
        out = {"times_s": self.times, "median_s": med, "gb_per_s": state_bytes / 1e9 / med,
               "rank_times_s": self.rank_times, "max_rank_times_s": max_rank,
               "median_max_rank_s": statistics.median(max_rank), "warmup": self.warmup}
        if any(self.rank_extras[0]):
            out["rank_extras"] = self.rank_extras
        return out


def measure(ops: list[Op], reps: int, rank: int) -> None:
    """One untimed warm-up per op, then `reps` timed rounds, round-robin."""
    import torch.distributed as dist

    live = []
    for op in ops:
        try:
            wall, own, extra = op.once("warmup", rank)
        except Exception as exc:  # a stager that cannot work on this machine (may_fail only)
            if not op.may_fail:
                raise
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            flags = [None] * WORLD
            dist.all_gather_object(flags, msg)
            op.unavailable = "; ".join(sorted({f for f in flags if f}))
            if rank == 0:
                print(f"   {op.name}: unavailable ({op.unavailable})", flush=True)
            continue
        op.warmup = {"time_s": wall, "rank_times_s": own, "rank_extras": extra}
        live.append(op)
    for rep in range(reps):
        for op in live:
            wall, own, extra = op.once(rep, rank)
            op.times.append(wall)
            op.rank_times.append(own)
            op.rank_extras.append(extra)


# --------------------------------------------------------------------------
# Worker (one per rank)
# --------------------------------------------------------------------------

def worker(rank: int, world: int, port: int, p: dict) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.device_mesh import init_device_mesh

    from ckptio.distributed import StorageReader, StorageWriter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    mesh = init_device_mesh("cpu", (world,))
    ckpt_group = dist.new_group(backend="gloo")  # async_save's own group
    workdir, reps = p["workdir"], p["reps"]
    cold_cache = p["cold_cache"]
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    def fresh(tag_name: str, tag) -> str:
        return os.path.join(workdir, f"{tag_name}-{tag}")

    def rm_dir(path):
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    t0 = time.perf_counter()
    layout = global_layout(p["size_gib"])
    sd = make_sharded_state(layout, mesh, rank, "random")
    state = describe_layout(layout)
    log(f"   {state['tensors']} tensors, {state['bytes'] / GIB:.3f} GiB in all, "
        f"{state['bytes_per_rank'] / GIB:.3f} GiB a rank ({time.perf_counter() - t0:.1f} s)")
    nbytes = state["bytes"]
    checkpoint_bytes = {}
    checks = {}

    # --- save ------------------------------------------------------------------
    def save_op(name, short, make_writer):
        def run(tag):
            d = fresh(short, tag)
            dcp.save(sd, storage_writer=make_writer(d))
            return d

        def cleanup(d):
            if rank == 0:
                checkpoint_bytes[name] = dir_bytes(d)
            rm_dir(d)
        return Op(name, "save", run, before=os.sync, cleanup=cleanup)

    log("   dcp.save ...")
    saves = [save_op(SAVE_STOCK, "save-stock", lambda d: FileSystemWriter(d, sync_files=True)),
             save_op(SAVE_CKPTIO, "save-ckptio", lambda d: StorageWriter(d))]
    measure(saves, reps, rank)

    # --- load --------------------------------------------------------------------
    log("   dcp.load (cold cache) ...")
    stock_ckpt, ckptio_ckpt = os.path.join(workdir, "load-stock"), os.path.join(workdir, "load-ckptio")
    dcp.save(sd, storage_writer=FileSystemWriter(stock_ckpt, sync_files=True))
    dcp.save(sd, storage_writer=StorageWriter(ckptio_ckpt))
    target = make_sharded_state(layout, mesh, rank, "zeros")  # preallocated, touched
    for label, ckpt, make_reader in [("stock reader, stock checkpoint", stock_ckpt, FileSystemReader),
                                     ("ckptio reader, ckptio checkpoint", ckptio_ckpt, StorageReader),
                                     ("ckptio reader, stock checkpoint", stock_ckpt, StorageReader),
                                     ("stock reader, ckptio checkpoint", ckptio_ckpt, FileSystemReader)]:
        for t in local_tensors(target).values():
            if isinstance(t, torch.Tensor):
                t.zero_()
        target["step"] = 0
        dcp.load(target, storage_reader=make_reader(ckpt))
        checks[f"load round trip: {label}"] = same_state(sd, target)

    resident_after_evict = [0]

    def evict(ckpt):
        def before():
            os.sync()
            files = [os.path.join(ckpt, f) for f in os.listdir(ckpt)]
            if cold_cache:
                with open(PageCache.DROP, "w") as f:
                    f.write("3\n")
            else:
                for path in files:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
            resident = sum(resident_bytes(f) or 0 for f in files)
            resident_after_evict[0] = max(resident_after_evict[0], resident)
        return before

    def load_op(name, ckpt, make_reader):
        def run(tag):
            reader = make_reader(ckpt)
            read_data = reader.read_data
            spent = []

            def timed(*args, **kwargs):  # the reader's own part, apart from DCP's planning
                t = time.perf_counter()
                try:
                    return read_data(*args, **kwargs)
                finally:
                    spent.append(time.perf_counter() - t)

            reader.read_data = timed
            dcp.load(target, storage_reader=reader)
            return spent
        return Op(name, "load", run, before=evict(ckpt), after=lambda spent, t0: {"read_data_s": sum(spent)})

    loads = [load_op(LOAD_STOCK, stock_ckpt, FileSystemReader),
             load_op(LOAD_CKPTIO, ckptio_ckpt, StorageReader),
             load_op(LOAD_CKPTIO_NOVERIFY, ckptio_ckpt, lambda d: StorageReader(d, verify=False)),
             load_op(LOAD_STOCK_ON_CKPTIO, ckptio_ckpt, FileSystemReader)]
    measure(loads, reps, rank)
    if rank == 0:
        checkpoint_bytes["load checkpoint (stock)"] = dir_bytes(stock_ckpt)
        checkpoint_bytes["load checkpoint (ckptio)"] = dir_bytes(ckptio_ckpt)
    dist.barrier()
    rm_dir(stock_ckpt)
    rm_dir(ckptio_ckpt)

    # --- async_save stall ----------------------------------------------------------
    log("   dcp.async_save ...")
    first = fresh("async-unused", "0")
    reused = {"ckptio": StorageWriter(first),
              "stock-cached": FileSystemWriter(first, sync_files=True, cache_staged_state_dict=True)}

    def async_op(name, short, call, may_fail=False):
        def run(tag):
            d = fresh(short, tag)
            return call(d), d

        def after(result, t0):
            fut, _ = result
            fut.result()
            return {"durable_s": time.perf_counter() - t0}

        def cleanup(result):
            rm_dir(result[1])
        return Op(name, "async_save stall", run, before=os.sync, after=after, cleanup=cleanup, may_fail=may_fail)

    asyncs = [
        async_op(ASYNC_STOCK, "async-stock", lambda d: dcp.async_save(
            sd, storage_writer=FileSystemWriter(d, sync_files=True), process_group=ckpt_group)),
        async_op(ASYNC_CKPTIO, "async-ckptio", lambda d: dcp.async_save(
            sd, checkpoint_id=d, storage_writer=reused["ckptio"], process_group=ckpt_group)),
        async_op(ASYNC_CKPTIO_NEW, "async-ckptio-new", lambda d: dcp.async_save(
            sd, storage_writer=StorageWriter(d), process_group=ckpt_group)),
        async_op(ASYNC_STOCK_CACHED, "async-stock-cached", lambda d: dcp.async_save(
            sd, checkpoint_id=d, storage_writer=reused["stock-cached"], process_group=ckpt_group),
            may_fail=True),  # pins its cache: raises on a CPU-only torch
    ]
    measure(asyncs, reps, rank)

    # Snapshot check: change a tensor right after the call returns; the
    # checkpoint must hold the values from before the call.
    key = next(name for name, _, dtype in layout if dtype.is_floating_point)
    shard = sd[key].to_local()
    before_values = shard.clone()
    d = fresh("async-verify", "0")
    fut = dcp.async_save(sd, checkpoint_id=d, storage_writer=reused["ckptio"], process_group=ckpt_group)
    shard.add_(1)
    fut.result()
    shard.copy_(before_values)
    dcp.load(target, storage_reader=StorageReader(d))
    checks["async_save snapshot (reused ckptio writer, source changed after return)"] = same_state(sd, target)
    dist.barrier()
    rm_dir(d)
    for w in reused.values():
        w.close()

    # --- gather ----------------------------------------------------------------------
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v for k, v in checks.items()})
    dist.barrier()
    if rank == 0:
        all_checks = {k: {f"rank {r}": g[k] for r, g in enumerate(gathered)} for k in checks}
        out = {
            "state_dict": state,
            "checkpoint_bytes": checkpoint_bytes,
            "torch_num_threads_per_rank": torch.get_num_threads(),
            "save": {op.name: op.to_json(nbytes) for op in saves},
            "load": {op.name: op.to_json(nbytes) for op in loads},
            "async_save": {op.name: op.to_json(nbytes) for op in asyncs},
            "page_cache_max_bytes_resident_after_evict": resident_after_evict[0],
            "checks": all_checks,
            "checks_passed": all(v is None for c in all_checks.values() for v in c.values()),
        }
        with open(p["result_path"], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def worker_entry(rank: int, world: int, port: int, p: dict) -> None:
    try:
        worker(rank, world, port, p)
    except BaseException:
        traceback.print_exc()
        raise


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def durable_json(op_json: dict, state_bytes: int) -> dict:
    """The async_save ops' time until durable (max over ranks), as a measurement."""
    if "unavailable" in op_json:
        return op_json
    times = [max(e["durable_s"] for e in rep) for rep in op_json["rank_extras"]]
    med = statistics.median(times)
    return {"times_s": times, "median_s": med, "gb_per_s": state_bytes / 1e9 / med,
            "note": "per rank from the opening barrier to future.result(); max over ranks"}


def read_data_json(op_json: dict, state_bytes: int) -> dict:
    """The load ops' time inside StorageReader.read_data (max over ranks), as a measurement."""
    times = [max(e["read_data_s"] for e in rep) for rep in op_json["rank_extras"]]
    med = statistics.median(times)
    return {"times_s": times, "median_s": med, "gb_per_s": state_bytes / 1e9 / med,
            "note": "per rank, time inside StorageReader.read_data; max over ranks"}


def build_rows(r: dict) -> dict[str, dict]:
    """phase -> {measurement: json}; 'async_save until durable' and 'load,
    read_data only' derived from the async and load runs."""
    nbytes = r["state_dict"]["bytes"]
    phases = {"save": r["save"], "load": r["load"],
              READ_DATA: {name: read_data_json(m, nbytes) for name, m in r["load"].items()},
              "async_save stall": r["async_save"]}
    phases["async_save until durable"] = {name: durable_json(m, nbytes) for name, m in r["async_save"].items()}
    return phases


def comparisons(phases: dict) -> list[dict]:
    out = []
    for phase, ms in phases.items():
        base = ms[BASELINES[phase]]
        for name, m in ms.items():
            if name == BASELINES[phase]:
                continue
            value = (None if "unavailable" in m or "unavailable" in base
                     else base["median_s"] / m["median_s"])
            target = TARGET_LOAD_SPEEDUP if phase in ("load", READ_DATA) and name == LOAD_CKPTIO else None
            c = comparison(f"speedup vs {BASELINES[phase]} (its time / this time)",
                           f"{phase}: {name}", value if value is not None else 0.0, target)
            c["value"] = value
            out.append(c)
    return out


def print_table(results: dict) -> None:
    header = ("measurement", "median s", "max rank s", "GB/s", "ckptio vs stock", "target", "met?")
    tag = f"[{results['config']['size_gib']:g} GiB, {WORLD} ranks]"
    by_measurement = {c["measurement"]: c for c in results["comparisons"]}
    rows = []
    for phase, ms in results["phases"].items():
        for name, m in ms.items():
            key = f"{phase}: {name}"
            if "unavailable" in m:
                rows.append((f"{tag} {key}", "n/a", "n/a", "n/a", "unavailable (see JSON)", "-", "-"))
                continue
            c = by_measurement.get(key)
            ratio = "(baseline)" if c is None else (f"{_fmt_value(c)} faster" if c["value"] >= 1
                                                    else f"{1 / c['value']:.2f}x slower")
            max_rank = m.get("median_max_rank_s")
            rows.append((f"{tag} {key}", f"{m['median_s']:.3f}",
                         "-" if max_rank is None else f"{max_rank:.3f}",
                         f"{m['gb_per_s']:.2f}", ratio, _fmt_target(c) if c else "-", _fmt_met(c) if c else "-"))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    cache = results["page_cache"]
    print(f"\ncold cache: {cache['cold_cache']} ({cache['method']}"
          + (f"; {cache['reason']}" if cache["reason"] else "")
          + f"; max bytes of the checkpoint resident after eviction: {cache['max_file_bytes_resident_after_evict']})")
    print(f"checks (round trips, async snapshot): {'all passed' if results['checks_passed'] else 'FAILED'}")
    for name, per_rank in results["checks"].items():
        bad = {r: v for r, v in per_rank.items() if v is not None}
        if bad:
            print(f"   {name}: {bad}")
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total']} RAM, kernel {m['kernel']}, "
          f"{m['bench_dir_fs']} at {m['bench_dir']}, torch {m['torch']}, {WORLD} ranks x "
          f"{results['torch_num_threads_per_rank']} torch threads, CKPTIO_* {m['ckptio_env'] or 'unset'}, "
          f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=None,
                   help=f"total state over the {WORLD} ranks in GiB (default 2; --quick: {QUICK_SIZE_GIB})")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (>= 3)")
    p.add_argument("--dir", default=None,
                   help="directory to write in (a temp dir is made inside it); default: the repo root")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE_GIB} GiB unless --size-gib is given")
    args = p.parse_args(argv)
    if args.size_gib is None:
        args.size_gib = QUICK_SIZE_GIB if args.quick else 2.0
    if args.reps < 3:
        p.error("--reps must be at least 3")
    if args.size_gib <= 0:
        p.error("--size-gib must be positive")
    return args


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    parent = os.path.abspath(args.dir or REPO_ROOT)
    if filesystem_type(parent) == "tmpfs":
        print(f"warning: {parent} is tmpfs; disk numbers will be meaningless", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix=".ckptio-bench-dcp-", dir=parent)
    try:
        cache = PageCache()
        if not cache.cold_cache:
            print(f"note: cold_cache=false: {cache.reason}; using {cache.method}", flush=True)
        machine = machine_info(workdir)
        machine["loadavg_start"] = loadavg()
        if machine["loadavg_start"][0] > 0.5:
            print(f"note: load average {machine['loadavg_start'][0]:.2f} before starting: other work on "
                  "this machine will show in the timings", flush=True)
        print(f"== {args.size_gib:g} GiB over {WORLD} ranks, {args.reps} reps: spawning ranks ...", flush=True)
        params = {"size_gib": args.size_gib, "reps": args.reps, "workdir": workdir,
                  "cold_cache": cache.cold_cache, "result_path": os.path.join(workdir, "result.json")}
        mp.start_processes(worker_entry, args=(WORLD, free_port(), params), nprocs=WORLD,
                           start_method="spawn", join=True)
        with open(params["result_path"]) as f:
            r = json.load(f)
        machine["loadavg_end"] = loadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    cache.max_resident_after_evict = r.pop("page_cache_max_bytes_resident_after_evict")
    phases = build_rows(r)
    results = {
        "machine": machine,
        "config": {"size_gib": args.size_gib, "world_size": WORLD, "reps": args.reps,
                   "backend": "gloo", "timing": "rank 0, barrier to barrier (median); max over ranks of "
                                                "each rank's own time also given"},
        **{k: r[k] for k in ("state_dict", "checkpoint_bytes", "torch_num_threads_per_rank",
                             "checks", "checks_passed")},
        "phases": phases,
        "page_cache": cache.describe(),
        "cold_cache": cache.cold_cache,
    }
    results["comparisons"] = comparisons(phases)
    results["targets"] = "none given by the issue for this comparison: ratios only"
    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nresults written to {args.json}")
    return 0 if results["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
