#!/usr/bin/env python3
"""Benchmark ckptio's durable save, cold-cache load and CRC-32 against baselines.

What is compared, and why:

1. Durable save. ckptio.save returns only once the file is fsynced and renamed
   into place, so it is compared with things that are durable too:
   - ``dd oflag=direct conv=fsync`` writing the same number of bytes in the same
     directory: roughly what the disk can take. ckptio's bandwidth should be
     >= 0.9x of it.
   - ``torch.save`` followed by fsync of the file: what users do today.
     ckptio should be >= 2.5x faster.
   - ``safetensors.torch.save_file`` followed by fsync: for context.
   - ckptio.save over an existing checkpoint of the same size (the same path
     every time) vs the dd write of a new file: >= 0.95x (replacing must not
     pay for freeing the old file's blocks on the caller's path).
2. Load with a cold page cache (dropped before every load; if that is not
   allowed, the file's pages are evicted with posix_fadvise and the JSON says
   ``"cold_cache": false`` with the reason). All loads read the file written by
   ckptio.save and materialise every tensor (no mmap).
   - ckptio.load (CRC-32 verified, fresh memory) vs ``dd iflag=direct`` reading
     the same file: bandwidth ratio should be >= 0.9.
   - ckptio.load_into (verified) into a state dict that already exists (as a
     resumed model's does; allocated and touched once, reused) vs dd: >= 0.95.
   - both against ``fio`` reading the file with 8 MiB O_DIRECT requests, 8 in
     flight (libaio), when fio is installed: what the disk gives more than one
     stream. fio's own runtime is used (its start-up, ~0.3 s here, is not the
     disk's). Reported, no target.
   - ckptio.load vs ``torch.load(weights_only=True)``: reported.
   - verify=False vs verified, for load and load_into: verification should
     cost <= 5%.
3. CRC-32 of one core over a 256 MiB buffer: ckptio._C.crc32 (PCLMUL) should
   reach >= 8 GB/s; the portable fallback and zlib.crc32 are shown for context.

The state dicts mix a few large tensors, many medium ones and thousands of
small ones (fp32, bf16, int64). Per GiB: ~50% of the bytes in 4 large tensors,
~40% in ~100 medium ones, ~10% in ~2000 small ones (4-100 KiB); counts scale
with the size. Each measurement gets one untimed warm-up (first touch of fresh
memory is slow on some VMs), then ``--reps`` timed repetitions, interleaved
round-robin across the measurements; medians are reported. GB/s is 1e9 bytes
of the file per second. Nothing is tuned or adjusted: the table says whether
each target was met.

Usage: python bench/save_load.py [--sizes 1,4] [--reps 3] [--dir D] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
import safetensors
import safetensors.torch

import ckptio

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(REPO_ROOT, "bench", "results", "save_load.json")
GIB = 1 << 30
MIB = 1 << 20
DD_BLOCK = 8 * MIB
CRC_BUFFER_BYTES = 256 * MIB

# Targets from the issues (2, then 13 for loads, verification and replacing).
TARGET_SAVE_VS_DD = 0.90        # ckptio.save bandwidth / dd write bandwidth
TARGET_REPLACE_VS_DD = 0.95     # ckptio.save over an existing checkpoint / dd write of a new file
TARGET_SAVE_VS_TORCH = 2.5      # torch.save+fsync time / ckptio.save time
TARGET_LOAD_VS_DD = 0.90        # ckptio.load bandwidth / dd read bandwidth
TARGET_LOAD_INTO_VS_DD = 0.95   # ckptio.load_into bandwidth / dd read bandwidth
TARGET_VERIFY_COST_PCT = 5.0    # (verified - unverified) / unverified, in %
TARGET_CRC_GBPS = 8.0           # ckptio._C.crc32, one core
FIO_READ = ["--rw=read", "--direct=1", "--bs=8M", "--iodepth=8", "--ioengine=libaio"]


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------

def _read_first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def filesystem_type(directory: str) -> str | None:
    out = subprocess.run(["df", "-T", directory], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return lines[-1].split()[1] if out.returncode == 0 and len(lines) >= 2 else None


def machine_info(bench_dir: str) -> dict:
    try:
        from ckptio.config import engine_config
        engine = dataclasses.asdict(engine_config())
    except Exception as exc:  # informational only
        engine = f"unavailable: {exc!r}"
    return {
        "nproc": os.cpu_count(),
        "mem_total": _read_first("/proc/meminfo", "MemTotal"),
        "cpu_model": _read_first("/proc/cpuinfo", "model name"),
        "kernel": platform.release(),
        "bench_dir": bench_dir,
        "bench_dir_fs": filesystem_type(bench_dir),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "ckptio_crc32_backend": ckptio._C.crc32_backend(),
        "ckptio_env": {k: v for k, v in os.environ.items() if k.startswith("CKPTIO_")},
        "ckptio_engine_config": engine,
    }


# --------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def _random_tensor(nbytes: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    numel = max(1, nbytes // dtype.itemsize)
    if dtype.is_floating_point:
        return torch.randn(numel, dtype=dtype, generator=gen)
    return torch.randint(0, 1 << 31, (numel,), dtype=dtype, generator=gen)


def make_state_dict(size_gib: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """~50% of the bytes in large tensors, ~40% medium, ~10% small (4-100 KiB)."""
    total = size_gib * GIB
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_large = max(1, round(4 * size_gib))
    n_medium = max(1, round(100 * size_gib))
    n_small = max(1, round(2000 * size_gib))

    sizes: list[tuple[str, int]] = []
    sizes += [("large", int(0.5 * total / n_large))] * n_large
    medium_mean = 0.4 * total / n_medium
    sizes += [("medium", int(medium_mean * rng.uniform(0.5, 1.5))) for _ in range(n_medium)]
    small_mean = 0.1 * total / n_small
    sizes += [("small", int(rng.uniform(4 * 1024, 2 * small_mean - 4 * 1024))) for _ in range(n_small)]

    order = rng.permutation(len(sizes))  # interleave kinds as a model would
    sd = {}
    for i, j in enumerate(order):
        kind, nbytes = sizes[j]
        dtype = DTYPES[i % len(DTYPES)]
        sd[f"layers.{i}.{kind}"] = _random_tensor(nbytes, dtype, gen)
    return sd


def describe_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    by_kind: dict[str, dict] = {}
    for name, t in sd.items():
        kind = name.rsplit(".", 1)[1]
        entry = by_kind.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t.nbytes
    by_dtype: dict[str, int] = {}
    for t in sd.values():
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + t.nbytes
    return {
        "tensors": len(sd),
        "bytes": sum(t.nbytes for t in sd.values()),
        "by_kind": by_kind,
        "bytes_by_dtype": by_dtype,
    }


# --------------------------------------------------------------------------
# Helpers: fsync, dd, page cache
# --------------------------------------------------------------------------

def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_dd(*args: str) -> None:
    proc = subprocess.run(["dd", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dd {' '.join(args)} failed: {proc.stderr.strip()}")


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class PageCache:
    """Drops the page cache before a load; falls back to evicting one file."""

    DROP = "/proc/sys/vm/drop_caches"

    def __init__(self) -> None:
        self.cold_cache, self.reason = self._try_drop()
        self.method = "drop_caches" if self.cold_cache else "posix_fadvise(DONTNEED) of the file"
        self.max_resident_after_evict = 0

    def _try_drop(self) -> tuple[bool, str | None]:
        os.sync()
        try:
            with open(self.DROP, "w") as f:
                f.write("3\n")
            return True, None
        except OSError as exc:
            return False, f"cannot write {self.DROP}: {exc.strerror} (errno {exc.errno})"

    def evict(self, path: str) -> None:
        os.sync()
        if self.cold_cache:
            with open(self.DROP, "w") as f:
                f.write("3\n")
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        resident = resident_bytes(path)
        if resident is not None:
            self.max_resident_after_evict = max(self.max_resident_after_evict, resident)

    def describe(self) -> dict:
        return {
            "cold_cache": self.cold_cache,
            "reason": self.reason,
            "method": self.method,
            "max_file_bytes_resident_after_evict": self.max_resident_after_evict,
        }


def resident_bytes(path: str) -> int | None:
    """Bytes of `path` in the page cache (util-linux fincore), or None."""
    if shutil.which("fincore") is None:
        return None
    proc = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                          capture_output=True, text=True)
    try:
        return int(proc.stdout.strip())
    except ValueError:
        return None


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Op:
    """One measured operation: run(rep) returns what cleanup(result) disposes of."""
    name: str
    run: callable
    before: callable = lambda: None
    cleanup: callable = lambda result: None
    times: list = dataclasses.field(default_factory=list)
    nbytes: int = 0  # bytes of the file written or read, for GB/s
    extra: dict = dataclasses.field(default_factory=dict)  # reported as is

    def once(self, rep) -> float:
        self.before()
        t0 = time.perf_counter()
        result = self.run(rep)
        elapsed = time.perf_counter() - t0
        self.cleanup(result)
        return result.seconds if isinstance(result, ToolTime) else elapsed

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def gbps(self) -> float:
        return self.nbytes / 1e9 / self.median

    def to_json(self) -> dict:
        return {"times_s": self.times, "median_s": self.median, "bytes": self.nbytes,
                "gb_per_s": self.gbps, **self.extra}


@dataclasses.dataclass
class ToolTime:
    """A tool's own measurement of its run (fio's runtime, without its start-up)."""
    seconds: float


def measure(ops: list[Op], reps: int) -> None:
    """One untimed warm-up per op, then `reps` timed rounds, round-robin."""
    for op in ops:
        op.once("warmup")
    for rep in range(reps):
        for op in ops:
            op.times.append(op.once(rep))


# --------------------------------------------------------------------------
# Save and load benchmarks for one size
# --------------------------------------------------------------------------

def save_ops(sd: dict, workdir: str, file_bytes: int) -> list[Op]:
    def path(tag, rep):
        return os.path.join(workdir, f"{tag}-{rep}.bin")

    def delete_and_size(op):
        def cleanup(p):
            op.nbytes = os.path.getsize(p)
            remove(p)
        return cleanup

    direct_io = []  # SaveResult.direct_io of every call, warm-up included

    def ckptio_save(rep):
        res = ckptio.save(sd, path("ckptio", rep))
        direct_io.append(res.direct_io)
        return res.path

    replaced = path("ckptio-replaced", "fixed")

    def ckptio_replace(rep):
        # The same path every time: each save replaces the previous one (the
        # warm-up creates the first), whose blocks ext4 must free.
        return ckptio.save(sd, replaced).path

    def torch_save(rep):
        p = path("torch", rep)
        torch.save(sd, p)
        fsync_file(p)
        return p

    def safetensors_save(rep):
        p = path("safetensors", rep)
        safetensors.torch.save_file(sd, p)
        fsync_file(p)
        return p

    dd_count = math.ceil(file_bytes / DD_BLOCK)

    def dd_write(rep):
        p = path("dd", rep)
        run_dd("if=/dev/zero", f"of={p}", "oflag=direct", f"bs={DD_BLOCK}",
               f"count={dd_count}", "conv=fsync", "status=none")
        return p

    ops = [Op("dd write (direct, fsync)", dd_write, before=os.sync),
           Op("ckptio.save", ckptio_save, before=os.sync, extra={"direct_io": direct_io}),
           Op("torch.save + fsync", torch_save, before=os.sync),
           Op("safetensors save_file + fsync", safetensors_save, before=os.sync)]
    for op in ops:
        op.cleanup = delete_and_size(op)
    replace = Op("ckptio.save over an existing checkpoint", ckptio_replace, before=os.sync)
    replace.cleanup = lambda p: setattr(replace, "nbytes", os.path.getsize(p))
    return ops[:2] + [replace] + ops[2:]


def load_ops(path: str, sd: dict, cache: PageCache) -> list[Op]:
    nbytes = os.path.getsize(path)
    # load_into's destination: a state dict that exists before the load, as a
    # resumed model's does (allocated and touched once, reused every time).
    target = {k: torch.zeros_like(v) for k, v in sd.items()}

    def evict():
        cache.evict(path)

    def dd_read(rep):
        run_dd(f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}", "iflag=direct", "status=none")

    def fio_read(rep):
        out = subprocess.run(["fio", "--name=read", f"--filename={path}", "--readonly", *FIO_READ,
                              "--output-format=json"], check=True, capture_output=True, text=True).stdout
        read = json.loads(out)["jobs"][0]["read"]
        return ToolTime(read["io_bytes"] / read["bw_bytes"])  # fio's own runtime: its start-up (~0.3 s) left out

    ops = [Op("dd read (direct)", dd_read)]
    if shutil.which("fio"):
        ops.append(Op("fio read (direct, 8 MiB, iodepth 8, libaio)", fio_read))
    ops += [Op("ckptio.load (verify)", lambda rep: ckptio.load(path, verify=True)),
            Op("ckptio.load_into (verify)", lambda rep: ckptio.load_into(target, path, verify=True)),
            Op("torch.load (weights_only)", lambda rep: torch.load(path, weights_only=True)),
            Op("ckptio.load (verify=False)", lambda rep: ckptio.load(path, verify=False)),
            Op("ckptio.load_into (verify=False)", lambda rep: ckptio.load_into(target, path, verify=False))]
    for op in ops:  # the loaded state dict is freed when Op.once returns
        op.before, op.nbytes = evict, nbytes
    return ops


def check_roundtrip(sd: dict, path: str) -> None:
    """Untimed: ckptio.load, ckptio.load_into and torch.load all return exactly what was saved."""
    into = {k: torch.empty_like(v) for k, v in sd.items()}
    for loader in (ckptio.load, lambda p: torch.load(p, weights_only=True), lambda p: ckptio.load_into(into, p)):
        loaded = loader(path)
        assert loaded.keys() == sd.keys(), "loaded keys differ"
        for k, t in sd.items():
            assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), f"tensor {k} differs"
        del loaded


def bench_size(size_gib: float, reps: int, workdir: str, cache: PageCache) -> dict:
    print(f"\n== {size_gib:g} GiB: generating state dict ...", flush=True)
    t0 = time.perf_counter()
    sd = make_state_dict(size_gib)
    state = describe_state_dict(sd)
    print(f"   {state['tensors']} tensors, {state['bytes'] / GIB:.3f} GiB "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    load_path = os.path.join(workdir, "load.ckpt")
    file_bytes = ckptio.save(sd, load_path).bytes

    print("   saving ...", flush=True)
    saves = save_ops(sd, workdir, file_bytes)
    measure(saves, reps)

    print("   loading (cold cache) ...", flush=True)
    check_roundtrip(sd, load_path)
    loads = load_ops(load_path, sd, cache)
    measure(loads, reps)
    remove(load_path)
    del sd

    return {
        "size_gib": size_gib,
        "state_dict": state,
        "checkpoint_bytes": file_bytes,
        "save": {op.name: op.to_json() for op in saves},
        "load": {op.name: op.to_json() for op in loads},
        "comparisons": size_comparisons(size_gib, {op.name: op for op in saves + loads}),
    }


# --------------------------------------------------------------------------
# CRC-32
# --------------------------------------------------------------------------

def bench_crc(reps: int) -> dict:
    buf = np.random.default_rng(1).bytes(CRC_BUFFER_BYTES)
    impls = {
        "ckptio._C.crc32": ckptio._C.crc32,
        "ckptio._C.crc32_portable": ckptio._C.crc32_portable,
        "zlib.crc32": zlib.crc32,
    }
    out = {"buffer_bytes": CRC_BUFFER_BYTES, "backend": ckptio._C.crc32_backend()}
    values = set()
    for name, fn in impls.items():
        values.add(fn(buf))  # warm-up, and all three must agree
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(buf)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[name] = {"times_s": times, "median_s": med, "gb_per_s": CRC_BUFFER_BYTES / 1e9 / med}
    out["values_agree"] = len(values) == 1

    # Context for the one-core figure: the same CRC over a buffer that stays
    # in cache (what the folding code itself sustains), and how fast one core
    # can merely read memory (numpy's vectorised sum), which bounds any
    # streaming checksum.
    small = buf[: 1 << 20]
    rounds = CRC_BUFFER_BYTES // len(small)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(rounds):
            ckptio._C.crc32(small)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out["ckptio._C.crc32 (1 MiB, in cache)"] = {"times_s": times, "median_s": med,
                                                "gb_per_s": CRC_BUFFER_BYTES / 1e9 / med}
    words = np.frombuffer(buf, dtype=np.uint64)
    words.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        words.sum()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out["memory read (numpy sum, one core)"] = {"times_s": times, "median_s": med,
                                                "gb_per_s": CRC_BUFFER_BYTES / 1e9 / med}
    return out


# --------------------------------------------------------------------------
# Comparisons and report
# --------------------------------------------------------------------------

def comparison(label, measurement, value, target, higher_is_better=True, unit="x") -> dict:
    met = None if target is None else (value >= target if higher_is_better else value <= target)
    return {"label": label, "measurement": measurement, "value": value, "unit": unit,
            "target": target, "higher_is_better": higher_is_better, "met": met}


def size_comparisons(size_gib: float, ops: dict[str, Op]) -> list[dict]:
    ck_save, ck_load = ops["ckptio.save"], ops["ckptio.load (verify)"]
    no_verify = ops["ckptio.load (verify=False)"]
    into, into_no_verify = ops["ckptio.load_into (verify)"], ops["ckptio.load_into (verify=False)"]
    dd_read = ops["dd read (direct)"]
    fio = [op for name, op in ops.items() if name.startswith("fio read")]
    return [
        comparison("bandwidth vs dd write", "ckptio.save",
                   ck_save.gbps / ops["dd write (direct, fsync)"].gbps, TARGET_SAVE_VS_DD),
        comparison("bandwidth vs dd write (new file)", "ckptio.save over an existing checkpoint",
                   ops["ckptio.save over an existing checkpoint"].gbps / ops["dd write (direct, fsync)"].gbps,
                   TARGET_REPLACE_VS_DD),
        comparison("ckptio.save speedup", "torch.save + fsync",
                   ops["torch.save + fsync"].median / ck_save.median, TARGET_SAVE_VS_TORCH),
        comparison("ckptio.save speedup", "safetensors save_file + fsync",
                   ops["safetensors save_file + fsync"].median / ck_save.median, None),
        comparison("bandwidth vs dd read", "ckptio.load (verify)", ck_load.gbps / dd_read.gbps, TARGET_LOAD_VS_DD),
        comparison("bandwidth vs dd read", "ckptio.load_into (verify)", into.gbps / dd_read.gbps,
                   TARGET_LOAD_INTO_VS_DD),
        *[comparison("bandwidth vs dd read", f.name, f.gbps / dd_read.gbps, None) for f in fio],
        # The disk with 8 reads in flight, not one stream: loads against it too.
        *[comparison(f"bandwidth vs {f.name}", f"{op.name} vs fio", op.gbps / f.gbps, None)
          for f in fio for op in (ck_load, into)],
        comparison("ckptio.load speedup", "torch.load (weights_only)",
                   ops["torch.load (weights_only)"].median / ck_load.median, None),
        comparison("verify cost", "ckptio.load (verify=False)",
                   100.0 * (ck_load.median - no_verify.median) / no_verify.median,
                   TARGET_VERIFY_COST_PCT, higher_is_better=False, unit="%"),
        comparison("verify cost", "ckptio.load_into (verify=False)",
                   100.0 * (into.median - into_no_verify.median) / into_no_verify.median,
                   TARGET_VERIFY_COST_PCT, higher_is_better=False, unit="%"),
    ]


def crc_comparisons(crc: dict) -> list[dict]:
    fast = crc["ckptio._C.crc32"]["gb_per_s"]
    return [
        comparison("GB/s, one core", "ckptio._C.crc32", fast, TARGET_CRC_GBPS, unit=" GB/s"),
        comparison("ckptio._C.crc32 speedup", "ckptio._C.crc32_portable",
                   fast / crc["ckptio._C.crc32_portable"]["gb_per_s"], None),
        comparison("ckptio._C.crc32 speedup", "zlib.crc32", fast / crc["zlib.crc32"]["gb_per_s"], None),
        comparison("GB/s, in cache", "ckptio._C.crc32 (1 MiB, in cache)",
                   crc["ckptio._C.crc32 (1 MiB, in cache)"]["gb_per_s"], TARGET_CRC_GBPS, unit=" GB/s"),
        comparison("share of one core's memory read", "memory read (numpy sum, one core)",
                   fast / crc["memory read (numpy sum, one core)"]["gb_per_s"], None),
    ]


def _fmt_value(c: dict) -> str:
    return f"{c['value']:.1f}%" if c["unit"] == "%" else f"{c['value']:.2f}{c['unit']}"


def _fmt_target(c: dict) -> str:
    if c["target"] is None:
        return "-"
    op = ">=" if c["higher_is_better"] else "<="
    return f"{op} {c['target']:g}{c['unit']}"


def _fmt_met(c: dict) -> str:
    return "-" if c["met"] is None else ("yes" if c["met"] else "NO")


def print_table(results: dict) -> None:
    header = ("measurement", "median s", "GB/s", "ratio vs baseline", "target", "met?")
    rows = []
    for size in results["sizes"]:
        tag = f"[{size['size_gib']:g} GiB]"
        by_measurement = {c["measurement"]: c for c in size["comparisons"]}
        for phase in ("save", "load"):
            for name, m in size[phase].items():
                c = by_measurement.get(name)
                ratio = f"{c['label']}: {_fmt_value(c)}" if c else "(baseline)"
                rows.append((f"{tag} {phase}: {name}", f"{m['median_s']:.3f}", f"{m['gb_per_s']:.2f}",
                             ratio, _fmt_target(c) if c else "-", _fmt_met(c) if c else "-"))
        for c in size["comparisons"]:  # ratios against a second baseline
            if c["measurement"] not in size["save"] and c["measurement"] not in size["load"]:
                rows.append((f"{tag} load: {c['measurement']}", "-", "-", f"{c['label']}: {_fmt_value(c)}",
                             _fmt_target(c), _fmt_met(c)))
    crc = results["crc32"]
    by_measurement = {c["measurement"]: c for c in results["crc32_comparisons"]}
    for name in ("ckptio._C.crc32", "ckptio._C.crc32_portable", "zlib.crc32",
                 "ckptio._C.crc32 (1 MiB, in cache)", "memory read (numpy sum, one core)"):
        c = by_measurement[name]
        rows.append((f"[256 MiB] crc32: {name}", f"{crc[name]['median_s']:.3f}",
                     f"{crc[name]['gb_per_s']:.2f}", f"{c['label']}: {_fmt_value(c)}",
                     _fmt_target(c), _fmt_met(c)))

    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))
    cache = results["page_cache"]
    print(f"\ncold cache: {cache['cold_cache']} ({cache['method']}"
          + (f"; {cache['reason']}" if cache["reason"] else "")
          + f"; max bytes of the file resident after eviction: {cache['max_file_bytes_resident_after_evict']})")
    m = results["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total']} RAM, kernel {m['kernel']}, "
          f"{m['bench_dir_fs']} at {m['bench_dir']}, torch {m['torch']}, crc32 backend "
          f"{m['ckptio_crc32_backend']}, CKPTIO_* {m['ckptio_env'] or 'unset'}")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,4",
                   help="comma-separated state dict sizes in GiB (fractions allowed), default 1,4")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (>= 3)")
    p.add_argument("--dir", default=None,
                   help="directory to write in (a temp dir is made inside it); default: the repo root")
    p.add_argument("--json", default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = p.parse_args(argv)
    args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    if args.reps < 3:
        p.error("--reps must be at least 3")
    if not args.sizes or any(s <= 0 for s in args.sizes):
        p.error("--sizes must be positive numbers of GiB")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    parent = os.path.abspath(args.dir or REPO_ROOT)
    if filesystem_type(parent) == "tmpfs":
        print(f"warning: {parent} is tmpfs; disk numbers will be meaningless", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix=".ckptio-bench-", dir=parent)
    try:
        cache = PageCache()
        if not cache.cold_cache:
            print(f"note: cold_cache=false: {cache.reason}; using {cache.method}", flush=True)
        results = {"machine": machine_info(workdir), "config": {"sizes_gib": args.sizes, "reps": args.reps}}
        results["sizes"] = [bench_size(s, args.reps, workdir, cache) for s in args.sizes]
        print("\n== crc32 ...", flush=True)
        results["crc32"] = bench_crc(max(5, args.reps))
        results["crc32_comparisons"] = crc_comparisons(results["crc32"])
        results["page_cache"] = cache.describe()
        results["cold_cache"] = cache.cold_cache
        results["all_targets_met"] = all(
            c["met"] for group in [s["comparisons"] for s in results["sizes"]] + [results["crc32_comparisons"]]
            for c in group if c["met"] is not None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nall targets met: {results['all_targets_met']}; results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
