"""`ckptio bench`: save, load and stall on the user's own disk, against
torch.save, Lightning's AsyncCheckpointIO and torch.distributed.checkpoint.

A smaller, self-contained cousin of the repository's bench/ scripts (which
produce the figures in the README); medians of --reps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["check_bench_args", "run_bench"]


def _state(nbytes: int) -> dict[str, torch.Tensor]:
    import torch

    # Half in 4 large tensors, 40% in 100 medium, 10% in 1,000 small: fp32, bf16, int64.
    state: dict[str, torch.Tensor] = {}
    i = 0
    for share, count in ((0.5, 4), (0.4, 100), (0.1, 1000)):
        per = max(8, int(nbytes * share / count))
        for _ in range(count):
            dtype = (torch.float32, torch.bfloat16, torch.int64)[i % 3]
            n = max(1, per // torch.empty(0, dtype=dtype).element_size())
            state[f"t{i}"] = torch.ones(n, dtype=dtype)
            i += 1
    return state


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_bench_args(args: argparse.Namespace) -> None:
    """Everything that would make the run fail, checked before minutes of
    measuring: the directory to measure, where --json and --plot go, and
    matplotlib for --plot."""
    from .cli_outcome import CliFailure, Exit

    if not os.path.isdir(args.dir):
        what = "is not a directory" if os.path.exists(args.dir) else "does not exist"
        raise CliFailure(Exit.NOT_CHECKED, f"--dir {args.dir}: {what}", path="")
    if not os.access(args.dir, os.W_OK | os.X_OK):
        raise CliFailure(Exit.NOT_CHECKED, f"--dir {args.dir}: not writable (permission denied)", path="")
    for option, target in (("--json", args.json), ("--plot", args.plot)):
        if target in (None, "-"):
            continue
        parent = os.path.dirname(os.path.abspath(target))
        if os.path.isdir(target):
            raise CliFailure(Exit.NOT_CHECKED, f"{option} {target}: is a directory; name the file to write", path="")
        if not os.path.isdir(parent):
            raise CliFailure(Exit.NOT_CHECKED, f"{option} {target}: the directory {os.path.dirname(target)} does not "
                                               "exist", path="")
    if args.plot:
        _require_matplotlib()


def run_bench(args: argparse.Namespace, console: Any) -> int:
    import torch

    import ckptio

    from ._console import progress, table as Table

    state = _state(args.size)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    cold = None
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".ckptio-bench-") as d:
        p = lambda name: os.path.join(d, name)  # noqa: E731

        def torch_save() -> None:
            torch.save(state, p("torch.pt"))
            _fsync(p("torch.pt"))

        def ckptio_async_stall() -> float:
            h = ckptio.async_save(state, p("async.pt"))
            stall = h.stall_seconds
            h.result()
            return stall

        def lightning_stall() -> float:
            from lightning.fabric.plugins import TorchCheckpointIO
            from lightning.pytorch.plugins.io import AsyncCheckpointIO

            io = AsyncCheckpointIO(TorchCheckpointIO())
            t0 = time.perf_counter()
            io.save_checkpoint(state, p("lightning.pt"))
            stall = time.perf_counter() - t0
            io.teardown()
            return stall

        def dcp_save() -> None:
            import warnings

            import torch.distributed.checkpoint as dcp

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "overwriting an existing checkpoint": intended here
                dcp.save(state, storage_writer=dcp.FileSystemWriter(p("dcp"), sync_files=True), no_dist=True)

        def cold_load(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                nonlocal cold
                cold = _drop_caches()
                fn()
            return run

        cases: list[tuple[str, str, Callable[[], object]]] = [
            ("save", "ckptio.save (durable)", lambda: ckptio.save(state, p("ckptio.pt"))),
            ("save", "torch.save + fsync", torch_save),
            ("save", "DCP FileSystemWriter (sync_files)", dcp_save),
            ("load", "ckptio.load (CRC-verified)", cold_load(lambda: ckptio.load(p("ckptio.pt")))),
            ("load", "torch.load", cold_load(lambda: torch.load(p("ckptio.pt"), weights_only=True))),
            ("stall", "ckptio.async_save", ckptio_async_stall),
            ("stall", "Lightning AsyncCheckpointIO", lightning_stall),
        ]
        with progress(console, len(cases) * (args.reps + 1)) as step:
            for kind, name, fn in cases:
                times = []
                try:
                    for rep in range(args.reps + 1):
                        t0 = time.perf_counter()
                        measured = fn()
                        elapsed = measured if isinstance(measured, float) else time.perf_counter() - t0
                        if rep:  # the first run is a warm-up
                            times.append(elapsed)
                        step(name)
                except ImportError as e:
                    results[name] = {"kind": kind, "skipped": f"{e}"}
                    continue
                results[name] = {"kind": kind, "times_s": times, "median_s": statistics.median(times)}

    table = Table(f"ckptio bench: {nbytes / 2**30:.2f} GiB, {len(state)} tensors, in {os.path.abspath(args.dir)}")
    for col in ("", "operation", "median s", "GB/s"):
        table.add_column(col, justify="right" if col in ("median s", "GB/s") else "left")
    for name, r in results.items():
        if "skipped" in r:
            table.add_row(r["kind"], name, "skipped", r["skipped"][:40])
        else:
            table.add_row(r["kind"], name, f"{r['median_s']:.3f}", f"{nbytes / 1e9 / r['median_s']:.2f}")
    console.print(table)
    console.print(f"loads with a cold page cache: {cold}")
    report = {"bytes": nbytes, "tensors": len(state), "dir": os.path.abspath(args.dir), "cold_cache": cold,
              "reps": args.reps, "results": results, "cpus": os.cpu_count(), "torch": torch.__version__}
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        _plot(report, args.plot)
        console.print(f"plot written to {args.plot}")
    return 0


def _require_matplotlib() -> None:
    from .cli_outcome import CliFailure, Exit

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliFailure(Exit.UNSUPPORTED, "--plot needs matplotlib: pip install 'ckptio[cli]'", path="") from None


def _plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"save": "durable save", "load": "load (cold cache)", "stall": "async save: training stall"}
    fig, axes = plt.subplots(1, len(groups), figsize=(13, 4.2))
    for ax, (kind, title) in zip(axes, groups.items()):
        rows = [(n, r["median_s"]) for n, r in report["results"].items() if r["kind"] == kind and "median_s" in r]
        names = [n for n, _ in rows]
        secs = [s for _, s in rows]
        colors = ["#2a9d8f" if n.startswith("ckptio") else "#b0b0b0" for n in names]
        bars = ax.barh(names, secs, color=colors)
        ax.bar_label(bars, labels=[f"{s:.2f} s" for s in secs], padding=3)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel("seconds (lower is better)")
        ax.set_xlim(0, max(secs) * 1.35 if secs else 1)
    fig.suptitle(f"ckptio bench: {report['bytes'] / 2**30:.2f} GiB state, {report['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
