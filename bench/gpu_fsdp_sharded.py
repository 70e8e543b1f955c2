"""ckptio.lightning.FSDPStrategy (FSDP1, sharded state dicts) on a GPU: fit,
save sharded checkpoints asynchronously, resume, every tensor identical.
FSDP1 refuses the CPU, so this runs only where a GPU is (bench/gpu_check.sh).

Usage: python bench/gpu_fsdp_sharded.py DIR     (exit 1 if a tensor differs)
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import (
    FullStateDictConfig,
    FullyShardedDataParallel as FSDP,  # noqa: N817 - torch's own name for it
    StateDictType,
)

import ckptio.lightning

root = sys.argv[1]
dumps: dict[str, dict] = {}


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layers(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)),
                                           batch_size=8)

    def full_state(self) -> dict[str, torch.Tensor]:
        model = self.trainer.strategy.model
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True)):
            return {k: v.clone() for k, v in model.state_dict().items()}

    def on_train_start(self) -> None:
        if "resume" in dumps:
            dumps["resumed"] = self.full_state()

    def on_train_end(self) -> None:
        if "resume" not in dumps:
            dumps["fit"] = self.full_state()


def trainer(max_steps: int) -> pl.Trainer:
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), filename="last-{step}",
                                               every_n_train_steps=2, save_top_k=-1)
    return pl.Trainer(accelerator="cuda", devices=1, max_steps=max_steps, logger=False, callbacks=[checkpoints],
                      strategy=ckptio.lightning.FSDPStrategy(state_dict_type="sharded"), enable_progress_bar=False)


trainer(4).fit(Model())
newest = os.path.join(root, "ckpt", "last-step=4.ckpt")
print("saved:", sorted(os.listdir(newest)))
dumps["resume"] = {}
trainer(5).fit(Model(), ckpt_path=newest)
same = dumps["fit"].keys() == dumps["resumed"].keys() and all(
    torch.equal(dumps["fit"][k], dumps["resumed"][k]) for k in dumps["fit"])
print("FSDP1 sharded resume:", "identical" if same else "DIFFERS")
sys.exit(0 if same else 1)
