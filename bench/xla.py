"""ckptio's XLACheckpointIO against xm.save (+ fsync) for an XLA state.

Methodology: bench/README.md, "xla.py". Run in the torch_xla venv (`make test-xla` creates .venv-xla),
on the CPU device here: PJRT_DEVICE=CPU .venv-xla/bin/python bench/xla.py [--size-gib 1]
"""

import os
import sys
import time

import _common as common
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
            n = max(1, nbytes // dtype.itemsize)
            state[f"t{i}"] = torch.randn(n, dtype=dtype).to(device)
            used += n * dtype.itemsize
            i += 1
    torch_xla.sync()
    xm.wait_device_ops()
    return state, used


def timed(fn, reps):
    """One untimed warm-up, then `reps` timed calls."""
    return common.measure([common.Op("", lambda rep: fn())], reps)[0].times


def main():
    parser = common.parser(__doc__, "xla.json", reps=3)
    parser.add_argument("--size-gib", type=float, default=1.0)
    args = parser.parse_args()

    device = torch_xla.device()
    state, nbytes = make_state(args.size_gib, device)
    results = {}
    with common.temp_workdir(args.dir, ".ckptio-bench-xla-") as d:
        def xm_save():
            path = os.path.join(d, "xm.pt")
            xm.save(state, path)
            common.fsync_file(path)

        io = ckptio.XLACheckpointIO()
        async_io = ckptio.AsyncCheckpointIO(ckptio.XLACheckpointIO())
        stalls = []

        def ckptio_async():
            t0 = time.perf_counter()
            async_io.save_checkpoint(state, os.path.join(d, "async.pt"))
            stalls.append(time.perf_counter() - t0)
            async_io.teardown()

        results["xm.save + fsync"] = timed(xm_save, args.reps)
        results["ckptio XLACheckpointIO.save_checkpoint"] = timed(
            lambda: io.save_checkpoint(state, os.path.join(d, "ckptio.pt")), args.reps)
        results["ckptio AsyncCheckpointIO(XLACheckpointIO) until durable"] = timed(ckptio_async, args.reps)
        results["ckptio AsyncCheckpointIO(XLACheckpointIO) stall"] = stalls[1:]
        same = all(torch.equal(torch.load(os.path.join(d, "ckptio.pt"), weights_only=True)[k], v.cpu())
                   for k, v in list(state.items())[:20])

    report = {name: common.timing(times, nbytes) for name, times in results.items()}
    base = report["xm.save + fsync"]["median_s"]
    print(f"XLA state: {len(state)} tensors, {nbytes / 2**30:.2f} GiB on {device} "
          f"(PJRT_DEVICE={os.environ.get('PJRT_DEVICE')}); torch {torch.__version__}, "
          f"torch_xla {torch_xla.__version__}")
    print(f"{'measurement':<60}{'median s':>10}{'GB/s':>8}{'vs xm.save+fsync':>18}")
    for name, m in report.items():
        ratio = "(baseline)" if name.startswith("xm.save") else f"{base / m['median_s']:.2f}x faster"
        print(f"{name:<60}{m['median_s']:>10.3f}{m['gb_per_s']:>8.2f}{ratio:>18}")
    print(f"ckptio file matches the XLA tensors: {same}")
    common.write_json(args.json, {"bytes": nbytes, "tensors": len(state), "results": report, "matches": same,
                                  "machine": {"nproc": os.cpu_count(), "torch": torch.__version__,
                                              "torch_xla": torch_xla.__version__,
                                              "pjrt_device": os.environ.get("PJRT_DEVICE")}})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
