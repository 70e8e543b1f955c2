"""Benchmark ckptio's torch.distributed.checkpoint storage against DCP's stock one.

dcp.save, cold-cache dcp.load and the dcp.async_save stall of two gloo ranks holding DTensors sharded
with Shard(0). Methodology, baselines and targets: bench/README.md, "Distributed checkpoints".

Usage: python bench/dcp.py [--size-gib 2] [--reps 3] [--dir D] [--json F]
       python bench/dcp.py --quick           # 0.25 GiB, 3 reps
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable

import _common as common
import torch

WORLD = 2
QUICK_SIZE_GIB = 0.25

# The baselines' names (also JSON keys).
SAVE_STOCK = "stock FileSystemWriter(sync_files=True)"
# Issue 13: the verified ckptio reader (items read straight into the targets)
# against the stock reader, on the same sharding.
TARGET_LOAD_SPEEDUP = 1.5
LOAD_STOCK = "stock FileSystemReader (stock checkpoint)"
LOAD_CKPTIO = "ckptio StorageReader (ckptio checkpoint, verify)"
ASYNC_STOCK = "stock FileSystemWriter (default staging)"

READ_DATA = "load, read_data only"  # the StorageReader's own part of dcp.load
BASELINES = {"save": SAVE_STOCK, "load": LOAD_STOCK, READ_DATA: LOAD_STOCK, "async_save stall": ASYNC_STOCK,
             "async_save until durable": ASYNC_STOCK}


# --- State: DTensors sharded with Shard(0) over the 2-rank mesh --------------
COLS = {"large": 4096, "medium": 1024, "small": 64}


def global_layout(size_gib: float, seed: int = 0) -> list[tuple[str, tuple[int, int], torch.dtype]]:
    """(name, global shape, dtype) of every tensor: save_load.py's mix, 2-D, even rows."""
    layout = []
    for name, nbytes, dtype in common.state_layout(size_gib, seed):
        cols = COLS[name.rsplit(".", 1)[1]]
        rows = max(WORLD, WORLD * round(nbytes / dtype.itemsize / cols / WORLD))
        layout.append((name, (rows, cols), dtype))
    return layout


def make_sharded_state(layout, mesh, rank: int, fill: str, seed: int = 0) -> dict:
    """Local shards (rows/WORLD x cols) wrapped as DTensors; fill='random' or 'zeros'."""
    from torch.distributed.tensor import DTensor, Shard

    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    sd = {}
    for name, (rows, cols), dtype in layout:
        shape = (rows // WORLD, cols)
        # zeros: touched, every page is faulted in
        local = torch.zeros(shape, dtype=dtype) if fill == "zeros" else common.random_tensor(shape, dtype, gen)
        sd[name] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size((rows, cols)), stride=(cols, 1))
    sd["step"] = 1000 if fill == "random" else 0
    return sd


def describe_layout(layout) -> dict:
    out = common.describe_state_dict({name: torch.empty(shape, dtype=dtype, device="meta")  # sizes, no memory
                                      for name, shape, dtype in layout})
    return {**out, "bytes_per_rank": out["bytes"] // WORLD,
            "sharding": f"Shard(0) over a {WORLD}-rank CPU mesh (DTensor.from_local)",
            "non_tensor_items": ["step (int)"]}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


# --- Collective timing -------------------------------------------------------
@dataclasses.dataclass
class RankOp(common.Op):
    """An Op run on every rank between barriers, timed on rank 0 from barrier to barrier.

    before() runs on rank 0 before the opening barrier; after(result, t0) -> a dict of per-rank extras, on
    every rank after the closing barrier; cleanup(result) on every rank after a third barrier (rank 0
    deletes what was written). A may_fail op whose warm-up raises is reported unavailable from then on.
    """
    after: Callable = lambda result, t0: {}
    may_fail: bool = False
    rank_times: list = dataclasses.field(default_factory=list)   # per rep: every rank's own time for run()
    rank_extras: list = dataclasses.field(default_factory=list)  # per rep: every rank's after() dict
    warmup: dict | None = None
    unavailable: str | None = None

    def once(self, rep) -> float | None:
        import torch.distributed as dist

        if self.unavailable is not None:
            return None  # nothing to time; to_json() reports it unavailable
        if dist.get_rank() == 0:
            self.before()
        dist.barrier()
        t0 = time.perf_counter()
        try:
            result = self.run(rep)
        except Exception as exc:  # a stager that cannot work on this machine (may_fail only)
            if rep != "warmup" or not self.may_fail:
                raise
            flags = [None] * WORLD
            dist.all_gather_object(flags, f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            self.unavailable = "; ".join(sorted({f for f in flags if f}))
            if dist.get_rank() == 0:
                print(f"   {self.name}: unavailable ({self.unavailable})", flush=True)
            return None
        own = time.perf_counter() - t0
        dist.barrier()
        wall = time.perf_counter() - t0
        extra = self.after(result, t0)
        dist.barrier()
        self.cleanup(result)
        del result
        gc.collect()
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, {"own_s": own, **extra})
        rank_times = [g.pop("own_s") for g in gathered]
        if rep == "warmup":
            self.warmup = {"time_s": wall, "rank_times_s": rank_times, "rank_extras": gathered}
        else:
            self.rank_times.append(rank_times)
            self.rank_extras.append(gathered)
        return wall

    def to_json(self, state_bytes: int) -> dict:
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        max_rank = [max(r) for r in self.rank_times]
        out = common.timing(self.times, state_bytes, rank_times_s=self.rank_times, max_rank_times_s=max_rank,
                            median_max_rank_s=statistics.median(max_rank), warmup=self.warmup)
        if any(self.rank_extras[0]):
            out["rank_extras"] = self.rank_extras
        return out


# --- Worker (one per rank) ---------------------------------------------------
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
    cache = common.PageCache(cold_cache=p["cold_cache"])  # probed by the parent
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    def fresh(tag_name: str, tag) -> str:
        return os.path.join(workdir, f"{tag_name}-{tag}")

    def rm_dir(path):
        if rank == 0:
            common.remove(path)

    t0 = time.perf_counter()
    layout = global_layout(p["size_gib"])
    sd = make_sharded_state(layout, mesh, rank, "random")
    state = describe_layout(layout)
    log(f"   {state['tensors']} tensors, {state['bytes'] / common.GIB:.3f} GiB in all, "
        f"{state['bytes_per_rank'] / common.GIB:.3f} GiB a rank ({time.perf_counter() - t0:.1f} s)")
    checkpoint_bytes, checks = {}, {}

    # --- save ------------------------------------------------------------------
    def save_op(name, short, make_writer):
        def run(tag):
            dcp.save(sd, storage_writer=make_writer(fresh(short, tag)))
            return fresh(short, tag)

        def cleanup(d):
            if rank == 0:
                checkpoint_bytes[name] = dir_bytes(d)
            rm_dir(d)
        return RankOp(name, run, before=os.sync, cleanup=cleanup)

    log("   dcp.save ...")
    saves = common.measure([save_op(SAVE_STOCK, "save-stock", lambda d: FileSystemWriter(d, sync_files=True)),
                            save_op("ckptio StorageWriter", "save-ckptio", StorageWriter)], reps)

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
        for t in target.values():
            if isinstance(t, torch.Tensor):
                t.to_local().zero_()
        target["step"] = 0
        dcp.load(target, storage_reader=make_reader(ckpt))
        checks[f"load round trip: {label}"] = common.first_difference(sd, target)

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

        def evict():
            cache.evict(*(os.path.join(ckpt, f) for f in os.listdir(ckpt)))
        return RankOp(name, run, before=evict, after=lambda spent, t0: {"read_data_s": sum(spent)})

    loads = common.measure([
        load_op(LOAD_STOCK, stock_ckpt, FileSystemReader),
        load_op(LOAD_CKPTIO, ckptio_ckpt, StorageReader),
        load_op("ckptio StorageReader(verify=False) (ckptio checkpoint)", ckptio_ckpt,
                lambda d: StorageReader(d, verify=False)),
        load_op("stock FileSystemReader (ckptio checkpoint)", ckptio_ckpt, FileSystemReader)], reps)
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

    def async_op(name, short, storage, may_fail=False):
        """dcp.async_save into a fresh directory d, with the storage arguments storage(d)."""
        def run(tag):
            return dcp.async_save(sd, process_group=ckpt_group, **storage(fresh(short, tag))), fresh(short, tag)

        def after(result, t0):
            result[0].result()
            return {"durable_s": time.perf_counter() - t0}
        return RankOp(name, run, before=os.sync, after=after, cleanup=lambda result: rm_dir(result[1]),
                      may_fail=may_fail)

    asyncs = common.measure([
        async_op(ASYNC_STOCK, "async-stock", lambda d: {"storage_writer": FileSystemWriter(d, sync_files=True)}),
        async_op("ckptio StorageWriter (reused, checkpoint_id=)", "async-ckptio",
                 lambda d: {"checkpoint_id": d, "storage_writer": reused["ckptio"]}),
        async_op("ckptio StorageWriter (new writer per save)", "async-ckptio-new",
                 lambda d: {"storage_writer": StorageWriter(d)}),
        async_op("stock FileSystemWriter(cache_staged_state_dict=True, reused)", "async-stock-cached",
                 lambda d: {"checkpoint_id": d, "storage_writer": reused["stock-cached"]},
                 may_fail=True),  # pins its cache: raises on a CPU-only torch
    ], reps)

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
    difference = common.first_difference(sd, target)
    checks["async_save snapshot (reused ckptio writer, source changed after return)"] = difference
    dist.barrier()
    rm_dir(d)
    for w in reused.values():
        w.close()

    # --- gather ----------------------------------------------------------------------
    gathered = [None] * world
    dist.all_gather_object(gathered, checks)
    dist.barrier()
    if rank == 0:
        all_checks = {k: {f"rank {r}": g[k] for r, g in enumerate(gathered)} for k in checks}
        nbytes = state["bytes"]
        out = {
            "state_dict": state,
            "checkpoint_bytes": checkpoint_bytes,
            "torch_num_threads_per_rank": torch.get_num_threads(),
            "save": {op.name: op.to_json(nbytes) for op in saves},
            "load": {op.name: op.to_json(nbytes) for op in loads},
            "async_save": {op.name: op.to_json(nbytes) for op in asyncs},
            "page_cache_max_bytes_resident_after_evict": cache.max_resident_after_evict,
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


# --- Report ------------------------------------------------------------------
def rank_max_json(op_json: dict, key: str, state_bytes: int, note: str) -> dict:
    """A per-rank extra of every repetition (`key`, max over ranks), as a measurement."""
    if "unavailable" in op_json:
        return op_json
    return common.timing([max(e[key] for e in rep) for rep in op_json["rank_extras"]], state_bytes, note=note)


def build_rows(r: dict) -> dict[str, dict]:
    """phase -> {measurement: json}; 'async_save until durable' and 'load,
    read_data only' derived from the async and load runs."""
    nbytes = r["state_dict"]["bytes"]
    return {"save": r["save"], "load": r["load"],
            READ_DATA: {name: rank_max_json(m, "read_data_s", nbytes,
                                            "per rank, time inside StorageReader.read_data; max over ranks")
                        for name, m in r["load"].items()},
            "async_save stall": r["async_save"],
            "async_save until durable": {
                name: rank_max_json(m, "durable_s", nbytes,
                                    "per rank from the opening barrier to future.result(); max over ranks")
                for name, m in r["async_save"].items()}}


def comparisons(phases: dict) -> list[dict]:
    out = []
    for phase, ms in phases.items():
        base = ms[BASELINES[phase]]
        for name, m in ms.items():
            if name != BASELINES[phase]:
                value = None if "unavailable" in m or "unavailable" in base else base["median_s"] / m["median_s"]
                target = TARGET_LOAD_SPEEDUP if phase in ("load", READ_DATA) and name == LOAD_CKPTIO else None
                out.append(common.comparison(f"speedup vs {BASELINES[phase]} (its time / this time)",
                                             f"{phase}: {name}", value, target))
    return out


def report(results: dict, cache: common.PageCache) -> None:
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
            ratio, target, met = common.cells(c)
            if c is not None:
                ratio = f"{ratio} faster" if c["value"] >= 1 else f"{1 / c['value']:.2f}x slower"
            max_rank = m.get("median_max_rank_s")
            rows.append((f"{tag} {key}", f"{m['median_s']:.3f}", "-" if max_rank is None else f"{max_rank:.3f}",
                         f"{m['gb_per_s']:.2f}", ratio, target, met))
    common.print_table(("measurement", "median s", "max rank s", "GB/s", "ckptio vs stock", "target", "met?"), rows)
    print("\n" + cache.summary("checkpoint"))
    print(f"checks (round trips, async snapshot): {'all passed' if results['checks_passed'] else 'FAILED'}")
    for name, per_rank in results["checks"].items():
        bad = {r: v for r, v in per_rank.items() if v is not None}
        if bad:
            print(f"   {name}: {bad}")
    threads = results["torch_num_threads_per_rank"]
    print(common.machine_line(results["machine"], f"{WORLD} ranks x {threads} torch threads"))


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    p = common.parser(__doc__, "dcp.json", reps=3, min_reps=3)
    p.add_argument("--size-gib", type=float, default=None,
                   help=f"total state over the {WORLD} ranks in GiB (default 2; --quick: {QUICK_SIZE_GIB})")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SIZE_GIB} GiB unless --size-gib is given")
    args = p.parse_args(argv)
    if args.size_gib is None:
        args.size_gib = QUICK_SIZE_GIB if args.quick else 2.0
    if args.size_gib <= 0:
        p.error("--size-gib must be positive")

    with common.temp_workdir(args.dir, ".ckptio-bench-dcp-") as wd:
        cache = common.PageCache()
        machine = common.machine_info(wd)
        machine["loadavg_start"] = common.start_loadavg()
        print(f"== {args.size_gib:g} GiB over {WORLD} ranks, {args.reps} reps: spawning ranks ...", flush=True)
        params = {"size_gib": args.size_gib, "reps": args.reps, "workdir": wd,
                  "cold_cache": cache.cold_cache, "result_path": os.path.join(wd, "result.json")}
        mp.start_processes(worker_entry, args=(WORLD, common.free_port(), params), nprocs=WORLD,
                           start_method="spawn", join=True)
        with open(params["result_path"]) as f:
            r = json.load(f)
        machine["loadavg_end"] = common.loadavg()

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
        "comparisons": comparisons(phases),
        "targets": "none given by the issue for this comparison: ratios only",
    }
    report(results, cache)
    common.write_json(args.json, results)
    print(f"\nresults written to {args.json}")
    return 0 if results["checks_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
