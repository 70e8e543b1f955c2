"""A killed trainer loses no checkpoint, and its restart reads the newest from RAM.

    python examples/lightning_service.py

1. A child process trains with ``AsyncCheckpointIO(memory=2)``: every save is
   handed to the per-node checkpoint service (ckptio.service), which writes it
   durably and keeps the newest two in its memory tier. Right after the step-10
   checkpoint is handed over, the child SIGKILLs itself.
2. This process resumes with ``Trainer.fit(ckpt_path="last")``: the checkpoint
   the dead trainer handed over is whole on disk, and the plugin reads it from
   the memory tier (``last_loaded_tier == "memory"``), CRC-verified.

Everything is written under a temporary directory (a service directory of its
own included), removed at the end, with the service stopped.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import torch

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

import ckptio

KILL_AT_STEP = 10


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))

    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(256, 128), batch_size=8)


class DieAfterCheckpoint(pl.Callback):
    """SIGKILL this process once the step-KILL_AT_STEP checkpoint was handed over (as an OOM kill would)."""

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == KILL_AT_STEP:
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(root, max_steps, *callbacks):
    io = ckptio.AsyncCheckpointIO(memory=2)
    every = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True, every_n_train_steps=5)
    return io, pl.Trainer(max_steps=max_steps, plugins=[io], callbacks=[every, *callbacks], logger=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


def main():
    root = tempfile.mkdtemp(prefix="ckptio-service-example-")
    # A service of this example's own, which lets go of its memory 5 s after its last trainer.
    os.environ.update(CKPTIO_SERVICE_DIR=os.path.join(root, "service"), CKPTIO_MEMORY_KEEP_S="5")
    try:
        child = subprocess.run([sys.executable, __file__, "--train-and-die", root])
        print(f"trainer killed by signal {-child.returncode} after step {KILL_AT_STEP}")
        io, resumed = trainer(root, 2 * KILL_AT_STEP)
        resumed.fit(Model(), ckpt_path="last")
        print(f"resumed from step {KILL_AT_STEP} (read from the {io.last_loaded_tier} tier), "
              f"trained on to step {resumed.global_step}")
        assert io.last_loaded_tier == "memory" and resumed.global_step == 2 * KILL_AT_STEP
    finally:
        ckptio.wait()
        from ckptio.service.client import reset_client

        reset_client()  # this trainer lets go, and the service stops
        subprocess.run([sys.executable, "-m", "ckptio", "serve", "--stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train-and-die"]:
        _, t = trainer(sys.argv[2], 10 * KILL_AT_STEP, DieAfterCheckpoint())
        t.fit(Model())
    else:
        main()
