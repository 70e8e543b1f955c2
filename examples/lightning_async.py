"""The main job (`make demo`): train with Lightning, checkpoint with ckptio.

Trains a small model with ModelCheckpoint + ckptio's AsyncCheckpointIO,
resumes from last.ckpt, and prints a per-save report (how long training was
stalled, how long until the checkpoint was durable) next to the same run
with Lightning's default TorchCheckpointIO (torch.save, no fsync: "durable"
is measured by an fsync right after it).
"""

import os
import statistics
import tempfile
import time

import torch

import lightning.pytorch as pl
from lightning.fabric.plugins.io import TorchCheckpointIO as LightningTorchIO

import ckptio
from ckptio.lightning import CheckpointMetrics
from ckptio.plugins.checkpoint_io import save_reports

STEPS, EVERY = 24, 6


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                       torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024))

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(STEPS * 16, 1024), batch_size=16)


class TimedLightningIO(LightningTorchIO):
    """Lightning's default plugin, timed: stall = the save call; durable = plus an fsync."""

    def __init__(self):
        super().__init__()
        self.reports = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        start = time.perf_counter()
        super().save_checkpoint(checkpoint, path, storage_options)
        stall = time.perf_counter() - start
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        self.reports.append((os.path.basename(path), stall, time.perf_counter() - start, os.path.getsize(path)))


def run(root, plugin, max_steps, ckpt_path=None):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=EVERY,
                                              save_top_k=2, monitor="step", mode="max", save_last=True)
    callbacks = [checkpoint] + ([CheckpointMetrics()] if isinstance(plugin, ckptio.CheckpointIO) else [])
    trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, plugins=[plugin])
    model = Model()
    model.log = lambda *a, **k: None  # no metrics needed for this demo
    start = time.perf_counter()
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, time.perf_counter() - start


def main():
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    with tempfile.TemporaryDirectory(dir=os.getcwd(), prefix=".demo-") as root:
        print(f"== ckptio AsyncCheckpointIO: {STEPS} steps, a checkpoint every {EVERY} ==")
        cursor = save_reports()[1]
        ours = ckptio.AsyncCheckpointIO()
        trainer, seconds = run(os.path.join(root, "ckptio"), ours, STEPS)
        reports, _ = save_reports(cursor)
        print(f"{'checkpoint':<28}{'stall ms':>10}{'durable ms':>12}{'MB':>8}")
        for r in reports:
            print(f"{os.path.basename(r.path):<28}{r.stall_seconds * 1e3:>10.1f}"
                  f"{(r.stall_seconds + r.write_seconds) * 1e3:>12.1f}{r.bytes / 1e6:>8.1f}")
        stalls = [r.stall_seconds for r in reports]
        if len(stalls) > 2:  # the staging memory was faulted in at the first optimizer step, not by these
            steady = statistics.median(stalls[2:])
            print(f"first save {stalls[0] / steady:.2f}x, second {stalls[1] / steady:.2f}x the median "
                  f"of the later ones ({steady * 1e3:.1f} ms)")
        print(f"fit took {seconds:.2f} s")

        last = os.path.join(root, "ckptio", "ckpt", "last.ckpt")
        resumed, _ = run(os.path.join(root, "ckptio"), ckptio.AsyncCheckpointIO(), STEPS + EVERY, ckpt_path=last)
        print(f"resumed from last.ckpt at step {STEPS}, trained to step {resumed.global_step}; "
              f"last.ckpt verifies: {ckptio.verify(last).records} records intact")

        print("\n== Lightning's default TorchCheckpointIO, same run ==")
        theirs = TimedLightningIO()
        _, seconds = run(os.path.join(root, "lightning"), theirs, STEPS)
        print(f"{'checkpoint':<28}{'stall ms':>10}{'durable ms':>12}{'MB':>8}")
        for name, stall, durable, size in theirs.reports:
            print(f"{name:<28}{stall * 1e3:>10.1f}{durable * 1e3:>12.1f}{size / 1e6:>8.1f}")
        print(f"fit took {seconds:.2f} s")
        print("\n'stall' is how long training waited for the save; 'durable' is until the bytes were on disk.")


if __name__ == "__main__":
    main()
