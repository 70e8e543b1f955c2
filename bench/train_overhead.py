"""What a checkpoint costs a training loop, in training steps, for each checkpointing method.

Methodology and targets: bench/README.md, "train_overhead.py".

Usage: python bench/train_overhead.py [--blocks 40] [--steps 16] [--every 4] [--reps 5] [--json F]
"""

from __future__ import annotations

import os
import statistics
import time

import _common as common
import torch

import ckptio

METHODS = ["torch.save + fsync", "ckptio.save", "ckptio.async_save", "ckptio.async_save lazy", "dcp.async_save",
           "Lightning AsyncCheckpointIO"]
TARGETS = {"ckptio.async_save": 0.5, "ckptio.async_save lazy": 0.25}  # overhead / ckptio.save's (issue 12)


def worker(p: dict) -> dict:
    """Alternating windows of `steps` training steps in this one process:
    without checkpoints, then with one every `every` steps (plus the drain of
    what is still queued), `reps` times each. Comparing windows of the same
    process cancels what differs between processes (a 2-core VM's speed
    drifts by more than a fast checkpoint costs)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(p["blocks"]):
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

    save, drain = saver(p["method"], p["workdir"])
    for _ in range(p["warmup"]):
        step()
    save(state(-1), "warmup")  # first-use costs (staging memory, process group) happen before timing
    drain()

    steps, without, with_saves = p["steps"], [], []
    for _ in range(p["reps"]):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        without.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(steps):
            step()
            if (i + 1) % p["every"] == 0:
                save(state(i), f"s{i}")
        drain()  # a save is not free until it is durable
        with_saves.append(time.perf_counter() - start)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(t.numel() * t.element_size() for s in opt.state_dict()["state"].values()
                       for t in s.values() if torch.is_tensor(t))
    return {"method": p["method"], "without_s": without, "with_s": with_saves, "saves_per_window": steps // p["every"],
            "steps": steps, "state_bytes": state_bytes}


def saver(method: str, directory: str):
    """(save(state, name), drain()) of a checkpointing method."""
    def path(name):
        return os.path.join(directory, f"{name}.pt")

    if method == "torch.save + fsync":
        def save(state, name):
            torch.save(state, path(name))
            common.fsync_file(path(name))
        return save, lambda: None
    if method == "ckptio.save":
        return lambda state, name: ckptio.save(state, path(name)), lambda: None
    if method in ("ckptio.async_save", "ckptio.async_save lazy"):
        mode = "lazy" if method.endswith("lazy") else "eager"
        return lambda state, name: ckptio.async_save(state, path(name), snapshot=mode), ckptio.wait
    if method == "dcp.async_save":
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(common.free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
        pending = []

        def drain():
            while pending:
                pending.pop().result()

        def save(state, name):
            drain()
            pending.append(dcp.async_save(state, checkpoint_id=os.path.join(directory, name)))
        return save, drain
    if method == "Lightning AsyncCheckpointIO":
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
        io = AsyncCheckpointIO(TorchCheckpointIO())
        return lambda state, name: io.save_checkpoint(state, path(name)), io.teardown
    raise ValueError(method)


def main(argv=None) -> int:
    common.serve_worker({"train": worker})
    p = common.parser(__doc__, "train_overhead.json", reps=5, dir_default="bench/")
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=16, help="steps per window (default 16)")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    args = p.parse_args(argv)

    params = {k: getattr(args, k) for k in ("blocks", "warmup", "steps", "every", "reps")}
    results = []
    with common.temp_workdir(args.dir, "train_overhead-", default=common.HERE) as wd:
        machine = common.machine_info(wd)
        for method in args.methods.split(","):
            results.append(common.run_worker("train", {**params, "method": method}, wd, check=True))
            for name in os.listdir(wd):  # its checkpoints
                common.remove(os.path.join(wd, name))
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
    common.write_json(args.json, {"machine": machine, "args": vars(args), "rows": rows, "runs": results}, indent=1)
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
