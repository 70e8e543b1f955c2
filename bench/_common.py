"""What the bench/ scripts share, so that each script reads as its measurement only.

Imported as ``_common``: Python puts the running script's directory (bench/) on sys.path and nothing else
of the repository, so the installed ckptio is the one measured. See bench/README.md, "Shared helpers".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils._pytree import keystr, tree_flatten_with_path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
GIB = 1 << 30
MIB = 1 << 20
DD_BLOCK = 8 * MIB


# --- Machine description -----------------------------------------------------
def proc_field(path: str, prefix: str) -> str | None:
    """The value on the first line of a /proc file that starts with `prefix` ("MemTotal"), or None."""
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def filesystem_type(directory: str) -> str | None:
    out = subprocess.run(["df", "-T", directory], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return lines[-1].split()[1] if out.returncode == 0 and len(lines) >= 2 else None


def mem_available() -> int:
    value = proc_field("/proc/meminfo", "MemAvailable")
    return int(value.split()[0]) * 1024 if value else 0


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def start_loadavg() -> list[float]:
    """The load average before measuring, with a note when other work will show in the timings."""
    load = loadavg()
    if load[0] > 0.5:
        print(f"note: load average {load[0]:.2f} before starting: other work on "
              "this machine will show in the timings", flush=True)
    return load


def machine_info(bench_dir: str) -> dict:
    import safetensors

    import ckptio
    from ckptio.config import engine_config

    try:
        engine = dataclasses.asdict(engine_config())
    except Exception as exc:  # informational only
        engine = f"unavailable: {exc!r}"
    return {
        "nproc": os.cpu_count(),
        "mem_total": proc_field("/proc/meminfo", "MemTotal"),
        "cpu_model": proc_field("/proc/cpuinfo", "model name"),
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


def machine_line(m: dict, extra: str) -> str:
    """The machine in one line for the report; `extra` goes after the torch version."""
    line = (f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_total']} RAM, kernel {m['kernel']}, "
            f"{m['bench_dir_fs']} at {m['bench_dir']}, torch {m['torch']}, {extra}, "
            f"CKPTIO_* {m['ckptio_env'] or 'unset'}")
    if "loadavg_end" in m:
        line += f", load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
    return line


# --- The benchmark state dict ------------------------------------------------
DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def state_layout(size_gib: float, seed: int = 0) -> list[tuple[str, int, torch.dtype]]:
    """(name, bytes, dtype) of every tensor, kinds interleaved as a model's are.

    Per GiB, ~50% of the bytes in 4 large tensors, ~40% in ~100 medium ones,
    ~10% in ~2000 small ones (4-100 KiB); counts scale with the size. The
    name ends with the kind (``layers.7.medium``)."""
    total = size_gib * GIB
    rng = np.random.default_rng(seed)
    n_large, n_medium, n_small = (max(1, round(n * size_gib)) for n in (4, 100, 2000))
    sizes = [("large", int(0.5 * total / n_large))] * n_large
    sizes += [("medium", int(0.4 * total / n_medium * rng.uniform(0.5, 1.5))) for _ in range(n_medium)]
    small_mean = 0.1 * total / n_small
    sizes += [("small", int(rng.uniform(4 * 1024, 2 * small_mean - 4 * 1024))) for _ in range(n_small)]
    order = rng.permutation(len(sizes))
    return [(f"layers.{i}.{sizes[j][0]}", sizes[j][1], DTYPES[i % len(DTYPES)]) for i, j in enumerate(order)]


def random_tensor(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, generator=gen)
    return torch.randint(0, 1 << 31, shape, dtype=dtype, generator=gen)


def make_state_dict(size_gib: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: random_tensor((max(1, nbytes // dtype.itemsize),), dtype, gen)
            for name, nbytes, dtype in state_layout(size_gib, seed)}


def describe_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    by_kind: dict[str, dict] = {}
    by_dtype: dict[str, int] = {}
    for name, t in sd.items():
        entry = by_kind.setdefault(name.rsplit(".", 1)[1], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t.nbytes
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + t.nbytes
    return {"tensors": len(sd), "bytes": sum(t.nbytes for t in sd.values()),
            "by_kind": by_kind, "bytes_by_dtype": by_dtype}


def first_difference(a, b) -> str | None:
    """None if `a` and `b` hold the same structure, values and tensors (dtype, shape and every bit; a
    DTensor's local shard), else the first difference."""
    (items_a, spec_a), (items_b, spec_b) = tree_flatten_with_path(a), tree_flatten_with_path(b)
    if spec_a != spec_b:
        return "structure differs"
    for (path, x), (_, y) in zip(items_a, items_b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            x, y = (t.to_local() if hasattr(t, "to_local") else t for t in (x, y))
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(raw_bytes(x), raw_bytes(y)):
                return f"tensor {keystr(path)} differs"
        elif type(x) is not type(y) or x != y:
            return f"value {keystr(path)} differs: {x!r} != {y!r}"
    return None


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as uint8 on the host, for a bit-for-bit comparison."""
    return t.detach().cpu().reshape(-1).view(torch.uint8)


# --- Files: fsync, dd, page cache, work directory, results -------------------
def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def run_dd(*args: str) -> None:
    proc = subprocess.run(["dd", *args, "status=none"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dd {' '.join(args)} failed: {proc.stderr.strip()}")


def dd_read(path: str) -> None:
    """The disk's single-stream read: dd with O_DIRECT and 8 MiB blocks."""
    run_dd(f"if={path}", "of=/dev/null", f"bs={DD_BLOCK}", "iflag=direct")


def remove(path: str) -> None:
    """Delete a file or a directory tree; gone already is fine."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def resident_bytes(path: str) -> int | None:
    """Bytes of `path` in the page cache (util-linux fincore), or None."""
    if shutil.which("fincore") is None:
        return None
    proc = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                          capture_output=True, text=True)
    return int(proc.stdout) if proc.stdout.strip().isdigit() else None


class PageCache:
    """Drops the page cache before a load; where that is not allowed, evicts
    the files read with posix_fadvise(DONTNEED) and says so (cold_cache=False).
    `cold_cache` given: another process probed it."""

    DROP = "/proc/sys/vm/drop_caches"

    def __init__(self, cold_cache: bool | None = None) -> None:
        self.cold_cache, self.reason, self.max_resident_after_evict = cold_cache, None, 0
        if cold_cache is None:
            os.sync()
            try:
                self._drop()
                self.cold_cache = True
            except OSError as exc:
                self.cold_cache = False
                self.reason = f"cannot write {self.DROP}: {exc.strerror} (errno {exc.errno})"
        self.method = "drop_caches" if self.cold_cache else "posix_fadvise(DONTNEED) of the file"
        if self.reason:
            print(f"note: cold_cache=false: {self.reason}; using {self.method}", flush=True)

    def _drop(self) -> None:
        with open(self.DROP, "w") as f:
            f.write("3\n")

    def evict(self, *paths: str) -> None:
        os.sync()
        if self.cold_cache:
            self._drop()
        else:
            for path in paths:
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        resident = [resident_bytes(p) for p in paths]
        if any(r is not None for r in resident):
            self.max_resident_after_evict = max(self.max_resident_after_evict, sum(r or 0 for r in resident))

    def describe(self) -> dict:
        return {"cold_cache": self.cold_cache, "reason": self.reason, "method": self.method,
                "max_file_bytes_resident_after_evict": self.max_resident_after_evict}

    def summary(self, what: str) -> str:
        return (f"cold cache: {self.cold_cache} ({self.method}" + (f"; {self.reason}" if self.reason else "")
                + f"; max bytes of the {what} resident after eviction: {self.max_resident_after_evict})")


@contextlib.contextmanager
def temp_workdir(parent: str | None, prefix: str, default: str = REPO_ROOT):
    """A fresh directory inside `parent` (or `default`), deleted with all it holds at the end."""
    parent = os.path.abspath(parent or default)
    if filesystem_type(parent) == "tmpfs":
        print(f"warning: {parent} is tmpfs; disk numbers will be meaningless", file=sys.stderr)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server or a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: str, results, indent: int = 2) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=indent)


def parser(doc: str, json_name: str | None, reps: int, min_reps: int = 1,
           dir_default: str = "the repo root") -> argparse.ArgumentParser:
    """An argument parser with the options every script has: --reps, --dir and --json."""
    def count(text: str) -> int:
        if int(text) < min_reps:
            raise argparse.ArgumentTypeError(f"must be at least {min_reps}")
        return int(text)

    default_json = os.path.join(HERE, "results", json_name) if json_name else None
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--reps", type=count, default=reps,
                   help=f"timed repetitions per measurement (>= {min_reps}), default {reps}")
    p.add_argument("--dir", default=None,
                   help=f"directory to write in (a temp dir is made inside it); default: {dir_default}")
    p.add_argument("--json", default=default_json, help=f"results file (default {default_json})")
    return p


def sizes_arg(text: str) -> list[float]:
    """--sizes 1,4: positive GiB, fractions allowed."""
    sizes = [float(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive numbers of GiB")
    return sizes


# --- Timing ------------------------------------------------------------------
def median(xs):
    return statistics.median(xs) if xs else None


def timing(times: list[float], nbytes: int | None = None, **extra) -> dict:
    """A measurement's JSON: every repetition, the median and, given the bytes, GB/s (1e9 bytes a second)."""
    out = {"times_s": times, "median_s": median(times)}
    if nbytes is not None:
        out["gb_per_s"] = nbytes / 1e9 / out["median_s"]
    return {**out, **extra}


class Seconds(float):
    """What an operation returns to be timed by its own clock (fio's runtime,
    a handle's stall_seconds) instead of the wall clock around the call."""


@dataclasses.dataclass
class Op:
    """One measured operation: run(rep) returns what cleanup(result) disposes of.
    before() and cleanup() are not timed; rep is "warmup" or the repetition."""
    name: str
    run: Callable
    before: Callable = lambda: None
    cleanup: Callable = lambda result: None
    times: list = dataclasses.field(default_factory=list)
    nbytes: int = 0  # bytes of the file written or read, for GB/s
    extra: dict = dataclasses.field(default_factory=dict)  # reported as is

    def once(self, rep) -> float:
        self.before()
        t0 = time.perf_counter()
        result = self.run(rep)
        elapsed = time.perf_counter() - t0
        self.cleanup(result)
        return float(result) if isinstance(result, Seconds) else elapsed

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def gbps(self) -> float:
        return self.nbytes / 1e9 / self.median


def measure(ops: list[Op], reps: int) -> list[Op]:
    """One untimed warm-up per op (first touch of fresh memory is slow on some
    VMs), then `reps` timed rounds, round-robin, so drift hits all alike."""
    for op in ops:
        op.once("warmup")
    for rep in range(reps):
        for op in ops:
            op.times.append(op.once(rep))
    return ops


# --- Comparisons and tables --------------------------------------------------
def comparison(label, measurement, value, target, higher_is_better=True, unit="x") -> dict:
    """A ratio (or a figure) and whether it met its target; a missing value
    (the measurement failed or is unavailable) misses any target it has."""
    met = None
    if target is not None:
        met = value is not None and (value >= target if higher_is_better else value <= target)
    return {"label": label, "measurement": measurement, "value": value, "unit": unit,
            "target": target, "higher_is_better": higher_is_better, "met": met}


def all_met(*groups: list[dict]) -> bool:
    return all(c["met"] for group in groups for c in group if c["met"] is not None)


def cells(c: dict | None) -> tuple[str, str, str]:
    """A comparison's value, target and verdict as table cells; c is None in its baseline's row."""
    if c is None:
        return "(baseline)", "-", "-"
    if c["value"] is None:
        value = "error"
    else:
        value = f"{c['value']:.1f}%" if c["unit"] == "%" else f"{c['value']:.2f}{c['unit']}"
    target = "-" if c["target"] is None else f"{'>=' if c['higher_is_better'] else '<='} {c['target']:g}{c['unit']}"
    met = c.get("note") or ("-" if c["met"] is None else ("yes" if c["met"] else "NO"))
    return value, target, met


def print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print()
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print(line.format(*r))


# --- Workers: one measurement in a fresh interpreter -------------------------
def run_worker(kind: str, params: dict, workdir: str, env_extra: dict | None = None, check: bool = False) -> dict:
    """Run this script's worker `kind` on `params` (plus "workdir") in a fresh interpreter; its result.

    It runs in `workdir` (a source checkout in the working directory would
    shadow the installed ckptio) after a sync, so a previous run's writeback
    lands in no timing. On failure: raise if `check`, else {"error": ...}."""
    out = os.path.join(workdir, f"result-{kind}-{os.getpid()}-{time.monotonic_ns()}.json")
    script = os.path.abspath(sys.modules["__main__"].__file__)
    os.sync()
    params = {**params, "workdir": workdir, "out": out}
    proc = subprocess.run([sys.executable, script, "--worker", kind, json.dumps(params)],
                          env={**os.environ, **(env_extra or {})}, cwd=workdir, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        if check:
            raise RuntimeError(f"{kind} worker failed (rc {proc.returncode}): {tail}")
        print(f"   !! {kind} worker failed (rc {proc.returncode}): {tail}", flush=True)
        return {"error": f"rc {proc.returncode}: {tail}"}
    with open(out) as f:
        result = json.load(f)
    remove(out)
    return result


def serve_worker(workers: dict[str, Callable[[dict], dict]]) -> None:
    """In a process run_worker started: run the worker, write its result, exit."""
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        params = json.loads(sys.argv[3])
        result = workers[sys.argv[2]](params)
        with open(params["out"], "w") as f:
            json.dump(result, f)
        sys.exit(0)
