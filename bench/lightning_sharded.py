"""What a sharded checkpoint costs a Lightning training run: ckptio's
ModelParallelStrategy against Lightning's own, same run.

Each variant is a real 2-process (gloo, CPU) Trainer.fit of an FSDP2 model
(fully_shard per layer) with AdamW, a ModelCheckpoint every EVERY steps:

- "none": no checkpoint, the run's training-step time;
- "stock": Lightning's ModelParallelStrategy (dcp.save with the stock
  FileSystemWriter, then torch.save of meta.pt; synchronous);
- "ckptio": ckptio.lightning.ModelParallelStrategy (dcp.async_save through
  ckptio's StorageWriter; meta.pt committed once every rank is durable).

Per variant: the stall (the extra time of a step that saves over the median
step without one, rank 0), the training cost per checkpoint (the fit's
steps-time over "none"'s, per checkpoint: the stall plus whatever the
background write takes from training on these cores), and for ckptio the
time from the save's start to durable. Median over the checkpoints of
--reps runs each; variants interleaved.

Usage: python bench/lightning_sharded.py [--layers 16] [--width 2048] [--reps 2] [--dir D] [--json F]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STEPS, EVERY = 16, 4
VARIANTS = ("none", "stock", "ckptio")


def fit(variant: str, root: str, out: str, layers: int, width: int) -> None:
    """One variant's fit (Lightning's launcher runs this again for rank 1); rank 0 writes `out`."""
    import lightning.pytorch as pl
    import torch
    from torch.distributed.fsdp import fully_shard

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def configure_model(self) -> None:
            for layer in self.layers:
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.log("step", float(self.global_step))
            return self.layers(batch).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(torch.randn(STEPS * 8, width), batch_size=8)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.saves: list[int] = []
            self.handles: list = []  # ckptio's: each save's result says how long it took to be durable

        def _note_handle(self, trainer) -> None:  # type: ignore[no-untyped-def]
            handle = getattr(trainer.strategy, "_ckptio_pending", None)
            if handle is not None and all(handle is not h for h in self.handles):
                self.handles.append(handle)

        def on_train_batch_start(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
            self._note_handle(trainer)
            self.starts.append(time.perf_counter())

        def on_save_checkpoint(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
            self.saves.append(len(self.starts) - 1)

        def on_train_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
            self._note_handle(trainer)
            if hasattr(trainer.strategy, "wait_for_checkpoints"):
                trainer.strategy.wait_for_checkpoints()
            end = time.perf_counter()
            if trainer.global_rank == 0:
                steps = [b - a for a, b in zip(self.starts, self.starts[1:] + [end])]
                durable = [h.result().write_seconds for h in self.handles]
                with open(out, "w") as f:
                    json.dump({"steps": steps, "saves": self.saves, "durable": durable}, f)

    if variant == "ckptio":
        import ckptio.lightning

        strategy = ckptio.lightning.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    callbacks: list = [Clock()]
    if variant != "none":
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), filename="{step}",
                                                      every_n_train_steps=EVERY, save_top_k=-1))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, callbacks=callbacks,
                         logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(Model())


def summarize(runs: list[dict]) -> dict:
    stalls, totals, durable = [], [], []
    for run in runs:
        steps, saves = run["steps"][1:], [s - 1 for s in run["saves"] if s >= 1]  # the first step warms up
        plain = statistics.median(t for i, t in enumerate(steps) if i not in saves)
        stalls += [steps[i] - plain for i in saves]
        totals.append(sum(steps))
        durable += run["durable"]
    return {"stall_s": statistics.median(stalls) if stalls else 0.0, "steps_total_s": statistics.median(totals),
            "checkpoints": len(runs[0]["saves"]), "durable_s": statistics.median(durable) if durable else None}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory here)")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "lightning_sharded.json"))
    args = ap.parse_args()
    params = args.layers * (args.width * args.width + args.width)
    checkpoint_gb = params * 4 * 3 / 1e9  # parameters and AdamW's two moments, fp32
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="ckptio-sharded-", dir=args.dir or os.getcwd()) as work:
        for rep in range(args.reps):
            for variant in VARIANTS:
                root, out = os.path.join(work, f"{variant}{rep}"), os.path.join(work, f"{variant}{rep}.json")
                subprocess.run([sys.executable, __file__, "--fit", variant, root, out, str(args.layers),
                                str(args.width)], check=True, capture_output=True, timeout=1800)
                with open(out) as f:
                    runs[variant].append(json.load(f))
                print(f"rep {rep + 1}/{args.reps}: {variant} done", flush=True)
    results = {v: summarize(r) for v, r in runs.items()}
    base = results["none"]["steps_total_s"]
    for v in ("stock", "ckptio"):
        r = results[v]
        r["cost_per_checkpoint_s"] = (r["steps_total_s"] - base) / r["checkpoints"]
    print(f"\n{checkpoint_gb:.2f} GB a checkpoint (2 ranks), {STEPS} steps, one every {EVERY}, median of {args.reps} "
          "runs each")
    print(f"{'variant':<34}{'stall s':>10}{'cost/ckpt s':>13}{'durable s':>11}{'stall vs stock':>16}")
    for v in ("stock", "ckptio"):
        r = results[v]
        ratio = results["stock"]["stall_s"] / r["stall_s"] if r["stall_s"] > 0 else float("inf")
        durable = f"{r['durable_s']:.2f}" if r["durable_s"] is not None else "-"
        name = {"stock": "Lightning ModelParallelStrategy", "ckptio": "ckptio ModelParallelStrategy"}[v]
        print(f"{name:<34}{r['stall_s']:>10.3f}{r['cost_per_checkpoint_s']:>13.3f}{durable:>11}"
              f"{'(baseline)' if v == 'stock' else f'{ratio:.1f}x less':>16}")
    print(f"(no checkpoint: {base:.2f} s for the {STEPS} steps)")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"checkpoint_gb": checkpoint_gb, "steps": STEPS, "every": EVERY, "reps": args.reps,
                   "results": results, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--fit":
        fit(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(main())
