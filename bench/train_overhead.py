#!/usr/bin/env python3
"""What a checkpoint costs a training loop, in training steps.

A CPU training loop (--blocks blocks of Linear(1024) + LayerNorm + GELU,
AdamW, batch 64) checkpoints {"model", "optimizer", "step"} every --every
steps with each method below. Each method runs in a fresh process: --warmup
untimed steps and one untimed checkpoint, then --reps pairs of windows of
--steps steps, one without checkpoints and one with them (ending with a
drain of anything still queued: a save is not free until it is durable).
The overhead per checkpoint is (median window with - median window without)
/ checkpoints per window, in units of that process's training step.

Methods: torch.save + fsync; ckptio.save; ckptio.async_save (waits for
nothing), eager and with snapshot="lazy"; torch.distributed.checkpoint.async_save (gloo group of one, the
previous future awaited before the next save, as DCP's docs do); Lightning's
AsyncCheckpointIO over its TorchCheckpointIO (teardown at the end).

Usage: python bench/train_overhead.py [--blocks 40] [--steps 16] [--every 4] [--reps 5] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

DEFAULT_JSON = os.path.join(os.path.dirname(HERE), "bench", "results", "train_overhead.json")
METHODS = ["torch.save + fsync", "ckptio.save", "ckptio.async_save", "ckptio.async_save lazy", "dcp.async_save",
           "Lightning AsyncCheckpointIO"]
TARGETS = {"ckptio.async_save": 0.5, "ckptio.async_save lazy": 0.25}  # overhead / ckptio.save's (issue 12)


def worker(method: str, blocks: int, warmup: int, steps: int, every: int, reps: int, directory: str) -> dict:
    """Alternating windows of `steps` training steps in this one process:
    without checkpoints, then with one every `every` steps (plus the drain of
    what is still queued), `reps` times each. Comparing windows of the same
    process cancels what differs between processes (a 2-core VM's speed
    drifts by more than a fast checkpoint costs)."""
    import torch

    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.LayerNorm(1024), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, 1024)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()

    def state(i):
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": i}

    save = _saver(method, directory)
    for i in range(warmup):
        step()
    save(state(-1), "warmup")  # first-use costs (staging memory, process group) happen before timing
    save.drain()

    without, with_saves, saves = [], [], 0
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(steps):
            step()
        without.append(time.perf_counter() - start)
        start = time.perf_counter()
        saves = 0
        for i in range(steps):
            step()
            if (i + 1) % every == 0:
                save(state(i), f"s{i}")
                saves += 1
        save.drain()  # a save is not free until it is durable
        with_saves.append(time.perf_counter() - start)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(t.numel() * t.element_size() for s in opt.state_dict()["state"].values()
                       for t in s.values() if torch.is_tensor(t))
    return {"method": method, "without_s": without, "with_s": with_saves, "saves_per_window": saves,
            "steps": steps, "state_bytes": state_bytes}


class _Saver:
    def __init__(self, save, drain=lambda: None):
        self._save, self.drain = save, drain

    def __call__(self, state, name):
        self._save(state, name)


def _saver(method: str, directory: str):
    import torch

    path = lambda name: os.path.join(directory, f"{name}.pt")  # noqa: E731
    if method == "torch.save + fsync":
        def save(state, name):
            with open(path(name), "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        return _Saver(save)
    if method == "ckptio.save":
        import ckptio
        return _Saver(lambda state, name: ckptio.save(state, path(name)))
    if method in ("ckptio.async_save", "ckptio.async_save lazy"):
        import ckptio
        mode = "lazy" if method.endswith("lazy") else "eager"
        return _Saver(lambda state, name: ckptio.async_save(state, path(name), snapshot=mode), ckptio.wait)
    if method == "dcp.async_save":
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
        pending = []

        def save(state, name):
            if pending:
                pending.pop().result()
            pending.append(dcp.async_save(state, checkpoint_id=os.path.join(directory, name)))

        def drain():
            while pending:
                pending.pop().result()
        return _Saver(save, drain)
    if method == "Lightning AsyncCheckpointIO":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
        io = AsyncCheckpointIO(TorchCheckpointIO())
        return _Saver(lambda state, name: io.save_checkpoint(state, path(name)), io.teardown)
    raise ValueError(method)


def run(method: str, args, directory: str) -> dict:
    params = [method, str(args.blocks), str(args.warmup), str(args.steps), str(args.every), str(args.reps), directory]
    # from the data directory: a source checkout in the working directory would shadow the install
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *params],
                         capture_output=True, text=True, check=True, cwd=directory)
    for name in os.listdir(directory):
        full = os.path.join(directory, name)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        m, blocks, warmup, steps, every, reps, directory = sys.argv[2:9]
        print(json.dumps(worker(m, int(blocks), int(warmup), int(steps), int(every), int(reps), directory)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="steps per window (default 16)")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="windows of each kind (default 5)")
    p.add_argument("--dir", default=None)
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    args = p.parse_args(argv)
    from save_load import machine_info

    directory = args.dir or tempfile.mkdtemp(prefix="train_overhead-", dir=HERE)
    results = [run(m, args, directory) for m in args.methods.split(",")]
    if not args.dir:
        os.rmdir(directory)
    rows = []
    for r in results:
        without, with_saves = statistics.median(r["without_s"]), statistics.median(r["with_s"])
        step_s = without / r["steps"]
        per_ckpt = (with_saves - without) / r["saves_per_window"]
        rows.append({"method": r["method"], "step_s": step_s, "overhead_per_checkpoint_s": per_ckpt,
                     "overhead_in_steps": per_ckpt / step_s})
    state_mib = results[0]["state_bytes"] / 2**20
    print(f"\ntraining overhead per checkpoint: {args.blocks} blocks, {state_mib:.0f} MiB model + AdamW state, "
          f"a checkpoint every {args.every} steps; windows of {args.steps} steps with and without checkpoints, "
          f"median of {args.reps} each, in one process per method")
    print(f"{'method':>30} {'step':>8} {'per checkpoint':>15} {'in steps':>9}")
    for r in rows:
        print(f"{r['method']:>30} {r['step_s'] * 1e3:>6.0f}ms {r['overhead_per_checkpoint_s'] * 1e3:>13.0f}ms "
              f"{r['overhead_in_steps']:>9.2f}")
    ck = {r["method"]: r["overhead_in_steps"] for r in rows}
    for method, target in TARGETS.items():
        if method in ck and ck.get("ckptio.save", 0) > 0:
            ratio = ck[method] / ck["ckptio.save"]
            print(f"{method} overhead / ckptio.save overhead: {ratio:.2f}x (target <= {target}x: "
                  f"{'met' if ratio <= target else 'MISSED'})")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": machine_info(HERE), "args": vars(args), "rows": rows, "runs": results}, f, indent=1)
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
