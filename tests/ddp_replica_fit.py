"""A 2-process (gloo, CPU) Lightning DDP fit for tests/test_lightning_replicas.py:
each rank a "node" with its own checkpoint service (ROOT/node<rank>), rank
0's checkpoints written by ckptio's AsyncCheckpointIO(memory=2) and
replicated to rank 1's node by ckptio.lightning.DDPStrategy(replicas=1).
Lightning's launcher runs this script again for rank 1.

    python ddp_replica_fit.py fit|resume ROOT OUT [CKPT]

fit: 6 steps, a checkpoint every 2 (the newest 2 kept) under ROOT/checkpoints;
OUT gets the model and optimizer state at the end. resume: fit from CKPT (one
step more); OUT gets the state as restored, and OUT.tier<rank> where each
rank's checkpoint came from.
"""

import os
import sys

import torch

mode, root, out = sys.argv[1:4]
ckpt = sys.argv[4] if len(sys.argv) > 4 else None
rank = int(os.environ.get("LOCAL_RANK", "0"))
os.environ["CKPTIO_SERVICE_DIR"] = os.path.join(root, f"node{rank}")  # before ckptio reads it

import lightning.pytorch as pl  # noqa: E402

import ckptio.lightning  # noqa: E402
from lightning_models import step_model_class  # noqa: E402
from ckptio.plugins import AsyncCheckpointIO  # noqa: E402


class Model(step_model_class(pl)):
    def _dump(self):
        if self.global_rank == 0:
            torch.save({"model": self.state_dict(), "optimizer": self.trainer.optimizers[0].state_dict(),
                        "step": self.global_step}, out)

    def on_train_start(self):
        if mode == "resume":
            self._dump()
            with open(f"{out}.tier{self.global_rank}", "w") as f:
                f.write(str(self.trainer.strategy.last_loaded_tier))

    def on_train_end(self):
        if mode == "fit":
            self._dump()


strategy = ckptio.lightning.DDPStrategy(replicas=1, partner=lambda r, w: (r + 1) % w)
checkpoints = pl.callbacks.ModelCheckpoint(dirpath=f"{root}/checkpoints", filename="{step}", monitor="step",
                                           mode="max", save_top_k=2, every_n_train_steps=2)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[AsyncCheckpointIO(memory=2)],
                     max_steps=7 if mode == "resume" else 6, callbacks=[checkpoints], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
trainer.fit(Model(), ckpt_path=ckpt)
