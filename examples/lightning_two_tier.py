"""Two-tier checkpoints with Lightning: local disk for speed, object storage for safety.

    python examples/lightning_two_tier.py [REMOTE_PREFIX]

REMOTE_PREFIX is any fsspec URL prefix (s3://bucket/run with s3fs and
credentials); by default ``memory://two-tier``, fsspec's in-process store,
so that the example runs anywhere. It trains with ckptio's AsyncCheckpointIO
copying every checkpoint to the remote tier (``remote_every=N`` copies every
N-th), wipes the local
checkpoint directory (the node is gone), and resumes the same ``ckpt_path``:
the plugin finds the local copy missing and loads the remote one.
"""

import os
import shutil
import sys
import tempfile

import torch

import lightning.pytorch as pl

import ckptio
from ckptio.lightning import CheckpointMetrics
from ckptio.plugins.checkpoint_io import save_reports


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(24 * 8, 256), batch_size=8)


def trainer(root, io, **kwargs):
    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, plugins=[io], **kwargs)


def main() -> None:
    remote = sys.argv[1] if len(sys.argv) > 1 else "memory://two-tier"
    root = tempfile.mkdtemp(prefix="ckptio-two-tier-")
    try:
        io = ckptio.AsyncCheckpointIO(remote=remote)
        every_4 = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=4,
                                               save_top_k=-1)
        model = Model()
        trainer(root, io, max_steps=16, callbacks=[every_4, CheckpointMetrics()]).fit(model)
        io.teardown()
        print(f"{'checkpoint':<28} {'stall ms':>9} {'local s':>8} {'remote s':>9}")
        for report in save_reports()[0]:
            remote_s = "-" if report.remote_seconds is None else f"{report.remote_seconds:.3f}"
            print(f"{os.path.basename(report.path):<28} {report.stall_seconds * 1e3:>9.1f} "
                  f"{report.write_seconds:>8.3f} {remote_s:>9}")

        newest = max(os.listdir(every_4.dirpath), key=lambda n: int(n.split("step=")[1].split(".")[0]))
        path = os.path.join(every_4.dirpath, newest)
        shutil.rmtree(every_4.dirpath)  # the node and its disk are gone
        resumed = trainer(root, ckptio.AsyncCheckpointIO(remote=remote), max_steps=20)
        resumed.fit(Model(), ckpt_path=path)  # the same path: its remote copy is loaded
        assert resumed.global_step == 20
        print(f"resumed {newest} from {remote} after the local copy was wiped, and trained on to step 20")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
