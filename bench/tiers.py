"""Two-tier checkpoints against an S3 API server (moto's, started here).

A CheckpointManager's saves with a remote tier, and ckptio.load(url) against download + load.
Methodology and target: bench/README.md, "tiers.py".

Usage: python bench/tiers.py [--size-gib 1] [--reps 3] [--dir D] [--json F]
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _common as common
from _common import Op


def start_server():
    port = common.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
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


def main(argv=None) -> int:
    p = common.parser(__doc__, None, reps=3, dir_default="the current directory")
    p.add_argument("--size-gib", type=float, default=1.0)
    args = p.parse_args(argv)

    import fsspec
    import s3fs

    import ckptio
    from ckptio import remote as remote_io
    from ckptio.config import remote_read_config

    server, endpoint = start_server()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**fsspec.config.conf["s3"])
    fs.mkdir("bench")
    try:
        with common.temp_workdir(args.dir, "ckptio-tiers-", default=".") as local_root:
            state = make_state(args.size_gib)
            manager = ckptio.CheckpointManager(os.path.join(local_root, "run"), keep_last=2,
                                               remote="s3://bench/run", keep_remote=2)
            saves = []
            for step in range(args.reps + 1):
                state["step"] = step
                start = time.perf_counter()
                handle = manager.save(step, state)
                stall = time.perf_counter() - start
                handle.local.result()  # the file is durable; its copy runs in the remote lane
                durable = time.perf_counter() - start
                result = handle.result()
                committed = time.perf_counter() - start
                assert result.remote is not None and result.remote.committed, result.remote
                if step:  # the first is the warm-up
                    saves.append({"stall_s": stall, "local_durable_s": durable, "remote_committed_s": committed,
                                  "bytes": result.bytes})
            manager.close()
            key = f"bench/run/step_{args.reps}.pt"
            nbytes = saves[-1]["bytes"]

            def download_then_load(rep):
                local = remote_io.download(f"s3://{key}", directory=local_root)
                try:
                    return ckptio.load(local)
                finally:
                    os.remove(local)

            def raw_single_stream(rep):
                with fs.open(key, "rb", block_size=remote_io.PART_BYTES) as f:
                    while f.read(remote_io.PART_BYTES):
                        pass

            def raw_ranged(rep):
                cfg = remote_read_config()
                spans = [(s, min(s + cfg.range_bytes, nbytes)) for s in range(0, nbytes, cfg.range_bytes)]
                with ThreadPoolExecutor(cfg.ranges_in_flight) as pool:
                    list(pool.map(lambda sp: len(fs.cat_file(key, start=sp[0], end=sp[1])), spans))

            # interleaved, so drift hits all alike; a loaded state is freed after its clock stops
            loads = common.measure([Op("ranged_load", lambda rep: ckptio.load(f"s3://{key}")),
                                    Op("download_then_load", download_then_load),
                                    Op("raw_get_single_stream", raw_single_stream),
                                    Op("raw_get_ranged", raw_ranged)], args.reps)
    finally:
        server.kill()
        server.wait()

    times = {op.name: op.times for op in loads}
    med = {op.name: op.median for op in loads}
    save_med = {k: statistics.median(s[k] for s in saves) for k in ("stall_s", "local_durable_s", "remote_committed_s")}
    speedup = med["download_then_load"] / med["ranged_load"]
    gb = nbytes / 1e9
    lines = [f"two-tier checkpoints, {gb:.2f} GB, moto S3 server on this machine, medians of {args.reps}", "",
             "per checkpoint                 seconds",
             *(f"  {k:<28} {v:7.3f}" for k, v in save_med.items()), "",
             "remote load                    seconds    GB/s",
             *(f"  {k:<28} {v:7.3f}  {gb / v:6.2f}" for k, v in med.items()), "",
             f"ranged load vs download + load: {speedup:.2f}x (target >= 2x: {'met' if speedup >= 2 else 'NOT met'})"]
    print("\n".join(lines))
    if args.json:
        common.write_json(args.json, {"bytes": nbytes, "reps": args.reps, "saves": saves, "save_medians": save_med,
                                      "load_seconds": times, "load_medians": med,
                                      "speedup_ranged_vs_download": speedup, "target_met": speedup >= 2})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
