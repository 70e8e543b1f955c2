"""A tiny LightningModule for either Lightning package (tests and the DDP script)."""

import importlib

import torch


def lightning_namespace(name: str):
    """`lightning.pytorch` or `pytorch_lightning`, imported."""
    return importlib.import_module("lightning.pytorch" if name == "lightning" else "pytorch_lightning")


def make_model_class(pl):
    """The model class for this Lightning package, importable by name (so
    ddp_spawn can pickle it)."""
    name = f"TinyModel_{pl.__name__.replace('.', '_')}"
    if name not in globals():
        globals()[name] = _define(pl, name)
    return globals()[name]


def _define(pl, name):
    class TinyModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(32, 2)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def test_step(self, batch, batch_idx):
            self.log("test_loss", self.layer(batch).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)),
                                               batch_size=4)

        test_dataloader = train_dataloader

    TinyModel.__name__ = TinyModel.__qualname__ = name
    return TinyModel


def step_model_class(pl):
    """The model of the 2-process fit scripts (sharded_fit.py, ddp_replica_fit.py):
    two linear layers, logging its step for ModelCheckpoint(monitor="step")."""
    class StepModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

        def training_step(self, batch, batch_idx):
            self.log("step", float(self.global_step))
            return self.layers(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            return torch.utils.data.DataLoader(torch.randn(64, 32, generator=g), batch_size=4)

    return StepModel


def trainer_kwargs(tmp_path, **extra):
    kwargs = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(extra)
    return kwargs


def __getattr__(name):
    # Unpickling in a spawned process looks the class up before anyone made it.
    packages = {"TinyModel_lightning_pytorch": "lightning.pytorch", "TinyModel_pytorch_lightning": "pytorch_lightning"}
    if name in packages:
        return make_model_class(importlib.import_module(packages[name]))
    raise AttributeError(name)
