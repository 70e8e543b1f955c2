"""ckptio's XLACheckpointIO against xm.save (+ fsync) for an XLA state.

Run in the torch_xla venv (`make test-xla` creates .venv-xla), on the CPU
device here: PJRT_DEVICE=CPU .venv-xla/bin/python bench/xla.py [--size-gib 1]

Both start from the same XLA tensors (materialised once, untimed) and end with
a checkpoint durable on disk: xm.save (torch.save of the host copies) is
followed by an fsync of the file; ckptio's save is durable when it returns.
The async row is how long AsyncCheckpointIO(XLACheckpointIO()) blocks the
caller (device-to-host transfer plus snapshot), and until it is durable.
Median of --reps after one warm-up.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch_xla
import torch_xla.core.xla_model as xm

import ckptio


def make_state(size_gib: float, device) -> dict:
    """A few large, some medium and many small tensors (fp32, bf16), on the XLA device."""
    total = int(size_gib * (1 << 30))
    state, used, i = {}, 0, 0
    for share, count in ((0.5, 4), (0.4, 100), (0.1, 1000)):
        nbytes = int(total * share / count)
        for _ in range(count):
            dtype = torch.float32 if i % 3 else torch.bfloat16
            n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
            state[f"t{i}"] = torch.randn(n, dtype=dtype).to(device)
            used += n * torch.tensor([], dtype=dtype).element_size()
            i += 1
    torch_xla.sync()
    xm.wait_device_ops()
    return state, used


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "xla.json"))
    args = parser.parse_args()

    device = torch_xla.device()
    state, nbytes = make_state(args.size_gib, device)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".ckptio-bench-xla-") as d:
        def xm_save():
            path = os.path.join(d, "xm.pt")
            xm.save(state, path)
            fsync_file(path)

        io = ckptio.XLACheckpointIO()

        def ckptio_save():
            io.save_checkpoint(state, os.path.join(d, "ckptio.pt"))

        async_io = ckptio.AsyncCheckpointIO(ckptio.XLACheckpointIO())
        stalls = []

        def ckptio_async():
            t0 = time.perf_counter()
            async_io.save_checkpoint(state, os.path.join(d, "async.pt"))
            stalls.append(time.perf_counter() - t0)
            async_io.teardown()

        results["xm.save + fsync"] = timed(xm_save, args.reps)
        results["ckptio XLACheckpointIO.save_checkpoint"] = timed(ckptio_save, args.reps)
        results["ckptio AsyncCheckpointIO(XLACheckpointIO) until durable"] = timed(ckptio_async, args.reps)
        results["ckptio AsyncCheckpointIO(XLACheckpointIO) stall"] = stalls[1:]
        same = all(torch.equal(torch.load(os.path.join(d, "ckptio.pt"), weights_only=True)[k], v.cpu())
                   for k, v in list(state.items())[:20])

    base = statistics.median(results["xm.save + fsync"])
    print(f"XLA state: {len(state)} tensors, {nbytes / 2**30:.2f} GiB on {device} "
          f"(PJRT_DEVICE={os.environ.get('PJRT_DEVICE')}); torch {torch.__version__}, torch_xla {torch_xla.__version__}")
    print(f"{'measurement':<60}{'median s':>10}{'GB/s':>8}{'vs xm.save+fsync':>18}")
    report = {}
    for name, times in results.items():
        med = statistics.median(times)
        report[name] = {"times_s": times, "median_s": med, "gb_per_s": nbytes / 1e9 / med}
        ratio = "(baseline)" if name.startswith("xm.save") else f"{base / med:.2f}x faster"
        print(f"{name:<60}{med:>10.3f}{nbytes / 1e9 / med:>8.2f}{ratio:>18}")
    print(f"ckptio file matches the XLA tensors: {same}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"bytes": nbytes, "tensors": len(state), "results": report, "matches": same,
                   "machine": {"nproc": os.cpu_count(), "torch": torch.__version__, "torch_xla": torch_xla.__version__,
                               "pjrt_device": os.environ.get("PJRT_DEVICE")}}, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
