#!/usr/bin/env python3
"""Two-tier checkpoints against an S3 API server (moto's, started here).

1. A CheckpointManager with a remote tier saves a state of --size-gib, --reps
   times. Per checkpoint: the caller's stall (manager.save returning), the
   time until the local copy was durable, and until the remote copy was
   committed (object whole and the remote ``latest`` moved). The remote copy
   runs on the queue right after the local commit, from the same staged
   bytes, so local-durable = committed - the copy's own time.
2. Loading that object back: ckptio.load(url) (parallel ranged GETs into
   memory, CRC-verified) vs what ckptio did before: one sequential download
   to a temporary file, then a load of it. Target: >= 2x. For what bounds
   both, the server's raw GET rate is measured too: one stream of the whole
   object, and the ranged GETs ckptio makes (CKPTIO_REMOTE_RANGE_MB,
   CKPTIO_REMOTE_RANGES), with nothing else done.

Medians of --reps after one warm-up. The server runs on this machine, so it
shares the two cores with the client: these are the figures of this box.

Usage: python bench/tiers.py [--size-gib 1] [--reps 3] [--dir D] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def start_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start")


def make_state(size_gib: float):
    import torch

    n = int(size_gib * (1 << 30)) // 4
    big = n // 8
    g = torch.Generator().manual_seed(0)
    return {"model": {f"w{i}": torch.randn(big, generator=g) for i in range(8)},
            "small": {f"s{i}": torch.randn(1000, generator=g) for i in range(100)}, "step": 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="local tier directory (default: a temporary one under .)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import fsspec
    import s3fs

    import ckptio
    from ckptio import remote as remote_io
    from ckptio.config import remote_read_config

    server, endpoint = start_server()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir("bench")
    local_root = tempfile.mkdtemp(prefix="ckptio-tiers-", dir=args.dir or ".")
    try:
        state = make_state(args.size_gib)
        manager = ckptio.CheckpointManager(os.path.join(local_root, "run"), keep_last=2, remote="s3://bench/run",
                                           keep_remote=2)
        saves = []
        for step in range(args.reps + 1):
            state["step"] = step
            start = time.perf_counter()
            handle = manager.save(step, state)
            stall = time.perf_counter() - start
            result = handle.result()
            committed = time.perf_counter() - start
            assert result.remote is not None and result.remote.committed, result.remote
            if step:  # the first is the warm-up
                saves.append({"stall_s": stall, "local_durable_s": committed - result.remote.seconds,
                              "remote_committed_s": committed, "bytes": result.bytes})
        manager.close()
        url = f"s3://bench/run/step_{args.reps}.pt"
        nbytes = saves[-1]["bytes"]

        def ranged_load():
            return ckptio.load(url)

        def download_then_load():
            local = remote_io.download(url, directory=local_root)
            try:
                return ckptio.load(local)
            finally:
                os.remove(local)

        def raw_single_stream():
            with fs.open(f"bench/run/step_{args.reps}.pt", "rb", block_size=remote_io.PART_BYTES) as f:
                while f.read(remote_io.PART_BYTES):
                    pass

        def raw_ranged():
            path = f"bench/run/step_{args.reps}.pt"
            cfg = remote_read_config()
            spans = [(s, min(s + cfg.range_bytes, nbytes)) for s in range(0, nbytes, cfg.range_bytes)]
            with ThreadPoolExecutor(cfg.ranges_in_flight) as pool:
                list(pool.map(lambda sp: len(fs.cat_file(path, start=sp[0], end=sp[1])), spans))

        loads = {"ranged_load": ranged_load, "download_then_load": download_then_load,
                 "raw_get_single_stream": raw_single_stream, "raw_get_ranged": raw_ranged}
        times = {name: [] for name in loads}
        for rep in range(args.reps + 1):
            for name, fn in loads.items():  # interleaved, so drift hits all alike
                start = time.perf_counter()
                out = fn()
                elapsed = time.perf_counter() - start
                del out
                if rep:
                    times[name].append(elapsed)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(local_root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    save_med = {k: statistics.median(s[k] for s in saves) for k in ("stall_s", "local_durable_s",
                                                                      "remote_committed_s")}
    speedup = med["download_then_load"] / med["ranged_load"]
    gb = nbytes / 1e9
    lines = [f"two-tier checkpoints, {gb:.2f} GB, moto S3 server on this machine, medians of {args.reps}", "",
             "per checkpoint                 seconds",
             *(f"  {k:<28} {v:7.3f}" for k, v in save_med.items()), "",
             "remote load                    seconds    GB/s",
             *(f"  {k:<28} {med[k]:7.3f}  {gb / med[k]:6.2f}" for k in loads), "",
             f"ranged load vs download + load: {speedup:.2f}x (target >= 2x: {'met' if speedup >= 2 else 'NOT met'})"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bytes": nbytes, "reps": args.reps, "saves": saves, "save_medians": save_med,
                       "load_seconds": times, "load_medians": med, "speedup_ranged_vs_download": speedup,
                       "target_met": speedup >= 2}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
