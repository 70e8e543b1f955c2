"""Benchmark ckptio's durable save, cold-cache load and CRC-32 against baselines.

Against dd, fio, torch.save/torch.load and safetensors, on state dicts of --sizes GiB. Methodology,
baselines and targets: bench/README.md, "Benchmarks".

Usage: python bench/save_load.py [--sizes 1,4] [--reps 3] [--dir D] [--json F]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import zlib

import _common as common
import numpy as np
import safetensors.torch
import torch
from _common import Op, comparison

import ckptio

CRC_BUFFER_BYTES = 256 * common.MIB

# Targets from the issues (2, then 13 for loads, verification and replacing).
TARGET_SAVE_VS_DD = 0.90        # ckptio.save bandwidth / dd write bandwidth
TARGET_REPLACE_VS_DD = 0.95     # ckptio.save over an existing checkpoint / dd write of a new file
TARGET_SAVE_VS_TORCH = 2.5      # torch.save+fsync time / ckptio.save time
TARGET_LOAD_VS_DD = 0.90        # ckptio.load bandwidth / dd read bandwidth
TARGET_LOAD_INTO_VS_DD = 0.95   # ckptio.load_into bandwidth / dd read bandwidth
TARGET_VERIFY_COST_PCT = 5.0    # (verified - unverified) / unverified, in %
TARGET_CRC_GBPS = 8.0           # ckptio._C.crc32, one core
FIO_READ = ["--rw=read", "--direct=1", "--bs=8M", "--iodepth=8", "--ioengine=libaio"]


def save_ops(sd: dict, workdir: str, file_bytes: int) -> list[Op]:
    direct_io = []  # SaveResult.direct_io of every call, warm-up included
    # The same path every time: each save replaces the previous one (the warm-up creates the first),
    # whose blocks ext4 must free.
    replaced = os.path.join(workdir, "ckptio-replaced-fixed.bin")

    def dd_write(path):
        common.run_dd("if=/dev/zero", f"of={path}", "oflag=direct", f"bs={common.DD_BLOCK}",
                      f"count={math.ceil(file_bytes / common.DD_BLOCK)}", "conv=fsync")

    def then_fsync(save):  # ckptio.save is durable when it returns: the baselines are made durable too
        def run(path):
            save(sd, path)
            common.fsync_file(path)
        return run

    def op(name, write, prefix=None, **kwargs):
        """An Op writing a fresh file `prefix`-`rep`.bin (no prefix: `replaced`); its size becomes op.nbytes."""
        def run(rep):
            path = os.path.join(workdir, f"{prefix}-{rep}.bin") if prefix else replaced
            write(path)
            return path

        def cleanup(path):
            measured.nbytes = os.path.getsize(path)
            if path != replaced:
                common.remove(path)
        measured = Op(name, run, before=os.sync, cleanup=cleanup, **kwargs)
        return measured

    return [op("dd write (direct, fsync)", dd_write, "dd"),
            op("ckptio.save", lambda path: direct_io.append(ckptio.save(sd, path).direct_io), "ckptio",
               extra={"direct_io": direct_io}),
            op("ckptio.save over an existing checkpoint", lambda path: ckptio.save(sd, path)),
            op("torch.save + fsync", then_fsync(torch.save), "torch"),
            op("safetensors save_file + fsync", then_fsync(safetensors.torch.save_file), "safetensors")]


def load_ops(path: str, sd: dict, cache: common.PageCache) -> list[Op]:
    # load_into's destination: a state dict that exists before the load, as a
    # resumed model's does (allocated and touched once, reused every time).
    target = {k: torch.zeros_like(v) for k, v in sd.items()}

    def fio_read(rep):
        out = subprocess.run(["fio", "--name=read", f"--filename={path}", "--readonly", *FIO_READ,
                              "--output-format=json"], check=True, capture_output=True, text=True).stdout
        read = json.loads(out)["jobs"][0]["read"]
        return common.Seconds(read["io_bytes"] / read["bw_bytes"])  # fio's own runtime: its start-up (~0.3 s) left out

    ops = [Op("dd read (direct)", lambda rep: common.dd_read(path))]
    if shutil.which("fio"):
        ops.append(Op("fio read (direct, 8 MiB, iodepth 8, libaio)", fio_read))
    ops += [Op("ckptio.load (verify)", lambda rep: ckptio.load(path, verify=True)),
            Op("ckptio.load_into (verify)", lambda rep: ckptio.load_into(target, path, verify=True)),
            Op("torch.load (weights_only)", lambda rep: torch.load(path, weights_only=True)),
            Op("ckptio.load (verify=False)", lambda rep: ckptio.load(path, verify=False)),
            Op("ckptio.load_into (verify=False)", lambda rep: ckptio.load_into(target, path, verify=False))]
    for op in ops:  # the loaded state dict is freed when Op.once returns
        op.before, op.nbytes = lambda: cache.evict(path), os.path.getsize(path)
    return ops


def check_roundtrip(sd: dict, path: str) -> None:
    """Untimed: ckptio.load, ckptio.load_into and torch.load all return exactly what was saved."""
    into = {k: torch.empty_like(v) for k, v in sd.items()}
    for loader in (ckptio.load, lambda p: torch.load(p, weights_only=True), lambda p: ckptio.load_into(into, p)):
        difference = common.first_difference(loader(path), sd)  # the loaded state is freed here
        assert difference is None, difference


def bench_size(size_gib: float, reps: int, workdir: str, cache: common.PageCache) -> dict:
    print(f"\n== {size_gib:g} GiB: generating state dict ...", flush=True)
    t0 = time.perf_counter()
    sd = common.make_state_dict(size_gib)
    state = common.describe_state_dict(sd)
    print(f"   {state['tensors']} tensors, {state['bytes'] / common.GIB:.3f} GiB "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    load_path = os.path.join(workdir, "load.ckpt")
    file_bytes = ckptio.save(sd, load_path).bytes
    print("   saving ...", flush=True)
    saves = common.measure(save_ops(sd, workdir, file_bytes), reps)
    print("   loading (cold cache) ...", flush=True)
    check_roundtrip(sd, load_path)
    loads = common.measure(load_ops(load_path, sd, cache), reps)
    common.remove(load_path)
    return {
        "size_gib": size_gib,
        "state_dict": state,
        "checkpoint_bytes": file_bytes,
        **{phase: {op.name: common.timing(op.times, op.nbytes, bytes=op.nbytes, **op.extra) for op in ops}
           for phase, ops in (("save", saves), ("load", loads))},
        "comparisons": size_comparisons({op.name: op for op in saves + loads}),
    }


def bench_crc(reps: int) -> dict:
    buf = np.random.default_rng(1).bytes(CRC_BUFFER_BYTES)
    small, words = buf[: 1 << 20], np.frombuffer(buf, dtype=np.uint64)
    values = set()  # every CRC of the buffer, warm-up included: all three implementations must agree

    def in_cache(rep):
        for _ in range(CRC_BUFFER_BYTES // len(small)):
            ckptio._C.crc32(small)

    crcs = {"ckptio._C.crc32": ckptio._C.crc32, "ckptio._C.crc32_portable": ckptio._C.crc32_portable,
            "zlib.crc32": zlib.crc32}
    ops = [Op(name, lambda rep, fn=fn: fn(buf), cleanup=values.add) for name, fn in crcs.items()]
    # Context for the one-core figure: the CRC's folding code on a buffer that
    # stays in cache, and how fast one core can merely read memory.
    ops += [Op("ckptio._C.crc32 (1 MiB, in cache)", in_cache),
            Op("memory read (numpy sum, one core)", lambda rep: words.sum())]
    out = {"buffer_bytes": CRC_BUFFER_BYTES, "backend": ckptio._C.crc32_backend()}
    for op in common.measure(ops, reps):
        out[op.name] = common.timing(op.times, CRC_BUFFER_BYTES)
    out["values_agree"] = len(values) == 1
    return out


def size_comparisons(ops: dict[str, Op]) -> list[dict]:
    def bandwidth(name, baseline):
        return ops[name].gbps / ops[baseline].gbps

    def speedup(baseline, name):  # how many times faster `name` is
        return ops[baseline].median / ops[name].median

    def cost_pct(verified, unverified):
        return 100.0 * (ops[verified].median - ops[unverified].median) / ops[unverified].median

    save, load, into = "ckptio.save", "ckptio.load (verify)", "ckptio.load_into (verify)"
    dd_write, dd_read = "dd write (direct, fsync)", "dd read (direct)"
    replace = "ckptio.save over an existing checkpoint"
    fio = [name for name in ops if name.startswith("fio read")]
    specs = [  # (label, measurement, value, target)
        ("bandwidth vs dd write", save, bandwidth(save, dd_write), TARGET_SAVE_VS_DD),
        ("bandwidth vs dd write (new file)", replace, bandwidth(replace, dd_write), TARGET_REPLACE_VS_DD),
        ("ckptio.save speedup", "torch.save + fsync", speedup("torch.save + fsync", save), TARGET_SAVE_VS_TORCH),
        ("ckptio.save speedup", "safetensors save_file + fsync", speedup("safetensors save_file + fsync", save),
         None),
        ("bandwidth vs dd read", load, bandwidth(load, dd_read), TARGET_LOAD_VS_DD),
        ("bandwidth vs dd read", into, bandwidth(into, dd_read), TARGET_LOAD_INTO_VS_DD),
        *[("bandwidth vs dd read", f, bandwidth(f, dd_read), None) for f in fio],
        # The disk with 8 reads in flight, not one stream: loads against it too.
        *[(f"bandwidth vs {f}", f"{name} vs fio", bandwidth(name, f), None) for f in fio for name in (load, into)],
        ("ckptio.load speedup", "torch.load (weights_only)", speedup("torch.load (weights_only)", load), None),
    ]
    unverified = {load: "ckptio.load (verify=False)", into: "ckptio.load_into (verify=False)"}
    return [comparison(*spec) for spec in specs] + [
        comparison("verify cost", plain, cost_pct(verified, plain), TARGET_VERIFY_COST_PCT, higher_is_better=False,
                   unit="%") for verified, plain in unverified.items()]


def crc_comparisons(crc: dict) -> list[dict]:
    gbps = {name: m["gb_per_s"] for name, m in crc.items() if isinstance(m, dict)}
    fast = gbps["ckptio._C.crc32"]
    in_cache, memory_read = "ckptio._C.crc32 (1 MiB, in cache)", "memory read (numpy sum, one core)"
    return [
        comparison("GB/s, one core", "ckptio._C.crc32", fast, TARGET_CRC_GBPS, unit=" GB/s"),
        *[comparison("ckptio._C.crc32 speedup", name, fast / gbps[name], None)
          for name in ("ckptio._C.crc32_portable", "zlib.crc32")],
        comparison("GB/s, in cache", in_cache, gbps[in_cache], TARGET_CRC_GBPS, unit=" GB/s"),
        comparison("share of one core's memory read", memory_read, fast / gbps[memory_read], None),
    ]


def report(results: dict, cache: common.PageCache) -> None:
    def row(name, m, c):
        value, target, met = common.cells(c)
        ratio = f"{c['label']}: {value}" if c else value
        return (name, m and f"{m['median_s']:.3f}", m and f"{m['gb_per_s']:.2f}", ratio, target, met)

    rows = []
    for size in results["sizes"]:
        tag = f"[{size['size_gib']:g} GiB]"
        by_measurement = {c["measurement"]: c for c in size["comparisons"]}
        for phase in ("save", "load"):
            rows += [row(f"{tag} {phase}: {name}", m, by_measurement.get(name)) for name, m in size[phase].items()]
        rows += [row(f"{tag} load: {c['measurement']}", None, c)  # ratios against a second baseline
                 for c in size["comparisons"] if c["measurement"] not in size["save"] | size["load"]]
    rows += [row(f"[256 MiB] crc32: {c['measurement']}", results["crc32"][c["measurement"]], c)
             for c in results["crc32_comparisons"]]
    common.print_table(("measurement", "median s", "GB/s", "ratio vs baseline", "target", "met?"),
                       [tuple(cell or "-" for cell in r) for r in rows])
    print("\n" + cache.summary("file"))
    m = results["machine"]
    print(common.machine_line(m, f"crc32 backend {m['ckptio_crc32_backend']}"))


def main(argv=None) -> int:
    p = common.parser(__doc__, "save_load.json", reps=3, min_reps=3)
    p.add_argument("--sizes", type=common.sizes_arg, default="1,4",
                   help="comma-separated state dict sizes in GiB (fractions allowed), default 1,4")
    args = p.parse_args(argv)
    with common.temp_workdir(args.dir, ".ckptio-bench-") as wd:
        cache = common.PageCache()
        results = {"machine": common.machine_info(wd), "config": {"sizes_gib": args.sizes, "reps": args.reps}}
        results["sizes"] = [bench_size(s, args.reps, wd, cache) for s in args.sizes]
        print("\n== crc32 ...", flush=True)
        results["crc32"] = bench_crc(max(5, args.reps))
        results["crc32_comparisons"] = crc_comparisons(results["crc32"])
        results["page_cache"] = cache.describe()
        results["cold_cache"] = cache.cold_cache
        results["all_targets_met"] = common.all_met(results["crc32_comparisons"],
                                                    *(s["comparisons"] for s in results["sizes"]))
    report(results, cache)
    common.write_json(args.json, results)
    print(f"\nall targets met: {results['all_targets_met']}; results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
